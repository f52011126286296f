// <notifier-inbox>: an embeddable notification bell and feed over notifier's in-app inbox API.
// No dependencies, no build step. Everything it draws lives in an open shadow root, styled through CSS custom
// properties (--notifier-*) and ::part(); it adds no global CSS. See the README ("Inbox component").
//
// Realtime without an SDK: the service signs an Ably token request for the user's own channel
// (POST /v1/users/{id}/inbox/realtime-token); the component exchanges it at Ably for a subscribe-only token
// (POST {token_url}, https://ably.com/docs/api/token-request-spec) and streams the channel with EventSource
// (GET {sse_url}&accessToken=..., https://ably.com/docs/api/sse). Each SSE "message" event carries an Ably
// Message whose `data` is encoded as its `encoding` says (the service publishes JSON: "json"); an expired
// token is announced as an `event: error` whose data is an ErrorInfo with code 40140-40149, and a refused
// connection is a plain HTTP error, which EventSource reports as an error with readyState CLOSED. Either way a
// fresh token request is fetched and the stream resumes from the last event id (`lastEvent`). Without Ably
// (the route answers {"mode": "polling"}) or while the stream is down, it polls the unread count with backoff.
"use strict";

(() => {
  if (typeof window === "undefined" || !window.customElements || window.customElements.get("notifier-inbox")) {
    return; // not a browser, or the script was loaded twice
  }

  // The origin this script came from: notifier's base URL unless the page says otherwise (base-url).
  const SCRIPT_ORIGIN = (() => {
    try {
      return new URL(document.currentScript.src).origin;
    } catch (error) {
      return window.location.origin;
    }
  })();

  const STRINGS = {
    bell: "Notifications",
    bellUnread: (n) => `Notifications, ${n} unread`,
    bellNone: "Notifications, none unread",
    bellUnavailable: "Notifications unavailable",
    countAnnouncement: (n) => (n === 0 ? "No unread notifications" : `${n} unread notification${n === 1 ? "" : "s"}`),
    newAnnouncement: (title) => `New notification: ${title}`,
    heading: "Notifications",
    views: "Notification views",
    inbox: "Inbox",
    archived: "Archived",
    markAllRead: "Mark all as read",
    markRead: "Mark read",
    markUnread: "Mark unread",
    archive: "Archive",
    unread: "Unread",
    loadMore: "Load more",
    loading: "Loading…",
    emptyInbox: "You have no notifications.",
    emptyArchived: "No archived notifications.",
    preferences: "Notification settings",
    allRead: "All notifications marked as read.",
    archivedOne: "Notification archived.",
    signedOut: "Sign in to see your notifications.",
    expired: "Your session has expired. Sign in again to see your notifications.",
    forbidden: "These notifications belong to another account.",
    failed: "The notifications could not be loaded. Check your connection.",
    actionFailed: "That change could not be saved. Please try again.",
    retry: "Try again",
  };

  const MAX_POLL_SECONDS = 300;
  const MAX_RECONNECT_SECONDS = 60;
  const TOKEN_EXPIRY_MARGIN_MS = 30_000; // ask the token callback for a new JWT this long before exp

  const STYLES = `
:host {
  --_accent: var(--notifier-accent, #1d5fd1);
  --_accent-text: var(--notifier-accent-text, #ffffff);
  --_surface: var(--notifier-surface, #ffffff);
  --_surface-hover: var(--notifier-surface-hover, #f1f4f8);
  --_unread-surface: var(--notifier-unread-surface, #f3f7ff);
  --_text: var(--notifier-text, #1b1f24);
  --_muted: var(--notifier-muted, #555f6b);
  --_border: var(--notifier-border, #d6dbe1);
  --_badge: var(--notifier-badge, #b3261e);
  --_badge-text: var(--notifier-badge-text, #ffffff);
  --_dot: var(--notifier-unread-dot, #1d5fd1);
  --_danger: var(--notifier-danger, #b3261e);
  --_focus: var(--notifier-focus, #f2a900);
  --_radius: var(--notifier-radius, 10px);
  --_width: var(--notifier-panel-width, 380px);
  --_height: var(--notifier-panel-max-height, 480px);
  --_font: var(--notifier-font, system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif);
  --_z: var(--notifier-z-index, 1000);
  display: inline-block;
  position: relative;
  font-family: var(--_font);
  font-size: 14px;
  line-height: 1.4;
  color: var(--_text);
  color-scheme: light;
}
:host([theme="dark"]) {
  --_accent: var(--notifier-accent, #8ab4ff);
  --_accent-text: var(--notifier-accent-text, #0d1117);
  --_surface: var(--notifier-surface, #1f2329);
  --_surface-hover: var(--notifier-surface-hover, #2a3038);
  --_unread-surface: var(--notifier-unread-surface, #243047);
  --_text: var(--notifier-text, #e8ebef);
  --_muted: var(--notifier-muted, #b3bcc6);
  --_border: var(--notifier-border, #3a414b);
  --_badge: var(--notifier-badge, #ff8a80);
  --_badge-text: var(--notifier-badge-text, #1b1f24);
  --_dot: var(--notifier-unread-dot, #8ab4ff);
  --_danger: var(--notifier-danger, #ff8a80);
  color-scheme: dark;
}
@media (prefers-color-scheme: dark) {
  :host(:not([theme="light"]):not([theme="dark"])) {
    --_accent: var(--notifier-accent, #8ab4ff);
    --_accent-text: var(--notifier-accent-text, #0d1117);
    --_surface: var(--notifier-surface, #1f2329);
    --_surface-hover: var(--notifier-surface-hover, #2a3038);
    --_unread-surface: var(--notifier-unread-surface, #243047);
    --_text: var(--notifier-text, #e8ebef);
    --_muted: var(--notifier-muted, #b3bcc6);
    --_border: var(--notifier-border, #3a414b);
    --_badge: var(--notifier-badge, #ff8a80);
    --_badge-text: var(--notifier-badge-text, #1b1f24);
    --_dot: var(--notifier-unread-dot, #8ab4ff);
    --_danger: var(--notifier-danger, #ff8a80);
    color-scheme: dark;
  }
}
* { box-sizing: border-box; }
[hidden] { display: none !important; }
button { font: inherit; color: inherit; cursor: pointer; }
:focus-visible { outline: 3px solid var(--_focus); outline-offset: 2px; }
.sr {
  position: absolute; width: 1px; height: 1px; padding: 0; margin: -1px; overflow: hidden;
  clip: rect(0 0 0 0); white-space: nowrap; border: 0;
}
.bell {
  position: relative; display: inline-flex; align-items: center; justify-content: center;
  width: 40px; height: 40px; border-radius: 999px; border: 1px solid transparent;
  background: transparent; color: var(--notifier-bell-color, currentColor);
}
.bell:hover { background: var(--_surface-hover); }
.bell svg { width: 22px; height: 22px; }
.badge {
  position: absolute; top: 2px; right: 0; min-width: 18px; height: 18px; padding: 0 5px;
  border-radius: 999px; background: var(--_badge); color: var(--_badge-text);
  font-size: 11px; font-weight: 700; line-height: 18px; text-align: center;
}
.panel {
  position: absolute; top: calc(100% + 8px); right: 0; z-index: var(--_z);
  width: min(var(--_width), calc(100vw - 16px)); max-height: var(--_height);
  display: flex; flex-direction: column;
  background: var(--_surface); color: var(--_text); border: 1px solid var(--_border);
  border-radius: var(--_radius); box-shadow: 0 12px 32px rgba(0, 0, 0, 0.18); overflow: hidden;
}
.panel.start { right: auto; left: 0; }
.panel:focus { outline: none; }
.header { display: flex; align-items: center; justify-content: space-between; gap: 8px; padding: 12px 14px 6px; }
.header h2 { margin: 0; font-size: 16px; }
.link-button {
  border: 0; background: none; padding: 4px 6px; border-radius: 6px; color: var(--_accent); font-size: 13px;
}
.link-button:hover { background: var(--_surface-hover); }
.link-button:disabled { color: var(--_muted); cursor: default; }
.tabs { display: flex; gap: 4px; padding: 0 10px; border-bottom: 1px solid var(--_border); }
.tab {
  border: 0; background: none; padding: 8px 10px; border-bottom: 2px solid transparent; color: var(--_muted);
}
.tab[aria-selected="true"] { color: var(--_text); border-bottom-color: var(--_accent); font-weight: 600; }
.notice { margin: 10px 14px; padding: 10px 12px; border: 1px solid var(--_danger); border-radius: 8px; }
.notice p { margin: 0 0 6px; }
.notice p:last-child { margin-bottom: 0; }
.feed { overflow-y: auto; flex: 1 1 auto; min-height: 60px; }
.list { list-style: none; margin: 0; padding: 0; }
.item { position: relative; border-bottom: 1px solid var(--_border); }
.item.unread { background: var(--_unread-surface); }
.open {
  display: grid; grid-template-columns: 12px 1fr; column-gap: 8px; width: 100%;
  padding: 10px 14px 4px; border: 0; background: none; text-align: left;
}
.open:hover { background: var(--_surface-hover); }
.dot { grid-row: 1; width: 8px; height: 8px; margin-top: 6px; border-radius: 999px; }
.unread .dot { background: var(--_dot); }
.title { grid-column: 2; font-weight: 600; }
.body { grid-column: 2; color: var(--_text); }
.time { grid-column: 2; color: var(--_muted); font-size: 12px; margin-top: 2px; }
.actions { display: flex; gap: 4px; justify-content: flex-end; padding: 0 10px 6px; }
.empty, .status-line { margin: 0; padding: 24px 14px; color: var(--_muted); text-align: center; }
.more { display: block; margin: 8px auto; }
.footer { border-top: 1px solid var(--_border); padding: 8px 14px; text-align: right; }
.footer a { color: var(--_accent); font-size: 13px; }
`;

  const TEMPLATE = `
<button class="bell" part="bell" type="button" aria-haspopup="dialog" aria-expanded="false" aria-controls="panel">
  <svg viewBox="0 0 24 24" aria-hidden="true" focusable="false"><path fill="currentColor"
    d="M12 22a2.5 2.5 0 0 0 2.45-2h-4.9A2.5 2.5 0 0 0 12 22Zm7-6V11a7 7 0 0 0-5.5-6.84V3.5a1.5 1.5 0 0 0-3 0v.66A7 7 0 0 0 5 11v5l-2 2v1h18v-1Z"/></svg>
  <span class="badge" part="badge" aria-hidden="true" hidden></span>
</button>
<span class="sr" role="status" aria-live="polite" aria-atomic="true"></span>
<div class="panel" part="panel" id="panel" role="dialog" aria-labelledby="heading" tabindex="-1" hidden>
  <div class="header" part="header">
    <h2 id="heading" part="heading"></h2>
    <button class="link-button mark-all" part="mark-all-button" type="button"></button>
  </div>
  <div class="tabs" part="tabs" role="tablist">
    <button class="tab" part="tab" role="tab" id="tab-inbox" type="button" aria-controls="feed" aria-selected="true"></button>
    <button class="tab" part="tab" role="tab" id="tab-archived" type="button" aria-controls="feed" aria-selected="false" tabindex="-1"></button>
  </div>
  <div class="notice" part="notice" role="alert" hidden><p class="notice-text"></p><button class="link-button retry" type="button" hidden></button></div>
  <div class="feed" part="feed" id="feed" role="tabpanel" aria-labelledby="tab-inbox">
    <ul class="list" part="list"></ul>
    <p class="empty" part="empty" hidden></p>
    <p class="status-line" part="loading" hidden></p>
    <button class="link-button more" part="load-more-button" type="button" hidden></button>
  </div>
  <div class="footer" part="footer"><a class="prefs" part="preferences-link" target="_blank" rel="noopener noreferrer"></a></div>
</div>`;

  class AuthFailure extends Error {
    constructor(status) {
      super(`HTTP ${status}`);
      this.status = status;
    }
  }

  class HttpFailure extends Error {
    constructor(status) {
      super(`HTTP ${status}`);
      this.status = status;
    }
  }

  function claimsOf(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const bytes = Uint8Array.from(atob(part + "=".repeat((4 - (part.length % 4)) % 4)), (c) => c.charCodeAt(0));
      return JSON.parse(new TextDecoder().decode(bytes)) || {};
    } catch (error) {
      return {};
    }
  }

  // Undo an Ably message's `encoding` (e.g. "json", "utf-8/base64"), last step first.
  function decodeAblyData(data, encoding) {
    let value = data;
    for (const step of (encoding || "").split("/").filter(Boolean).reverse()) {
      if (step === "json") value = JSON.parse(value);
      else if (step === "base64") value = Uint8Array.from(atob(value), (c) => c.charCodeAt(0));
      else if (step === "utf-8" && value instanceof Uint8Array) value = new TextDecoder().decode(value);
    }
    return value;
  }

  function safeHref(url) {
    try {
      const resolved = new URL(url, window.location.href);
      return resolved.protocol === "http:" || resolved.protocol === "https:" ? resolved.href : null;
    } catch (error) {
      return null;
    }
  }

  class NotifierInbox extends HTMLElement {
    static get observedAttributes() {
      return ["base-url", "user-id", "token"];
    }

    constructor() {
      super();
      this._token = null;
      this._tokenProvider = null;
      this._strings = STRINGS;
      this._generation = 0;
      this._state = "idle"; // idle | ready | signed-out | expired | forbidden
      this._realtimeMode = "off"; // off | ably | polling
      this._count = null;
      this._views = { inbox: this._emptyView(), archived: this._emptyView() };
      this._view = "inbox";
      this._known = new Set(); // inbox ids seen, so a repeated announcement is not counted twice
      this._arrivals = 0; // announcements counted so far: a count asked for before one may not include it
      this._timers = new Set();
      this._source = null;
      this._lastEventId = null;
      this._reconnectDelay = 1;
      this._pollDelay = null;
      this._channel = null;
      this._rendered = false;
      this._onDocumentPointer = (event) => {
        if (this._isOpen() && !event.composedPath().includes(this)) this.close();
      };
      this._onVisibility = () => {
        if (document.visibilityState === "visible" && this._state === "ready") {
          this._refreshCount();
          if (this._realtimeMode === "polling") this._schedulePoll(0);
        }
      };
    }

    // ---- public API --------------------------------------------------------------------------------------

    get token() {
      return this._token;
    }

    set token(value) {
      this._token = value ? String(value) : null;
      this._restart();
    }

    get tokenProvider() {
      return this._tokenProvider;
    }

    set tokenProvider(value) {
      this._tokenProvider = typeof value === "function" ? value : null;
      this._restart();
    }

    get strings() {
      return this._strings;
    }

    set strings(value) {
      this._strings = { ...STRINGS, ...(value || {}) };
      if (this._rendered) this._renderStatic();
    }

    get baseUrl() {
      return (this.getAttribute("base-url") || SCRIPT_ORIGIN).replace(/\/+$/, "");
    }

    set baseUrl(value) {
      this.setAttribute("base-url", value);
    }

    get userId() {
      return this.getAttribute("user-id") || (this._token ? claimsOf(this._token).sub : null) || null;
    }

    get unreadCount() {
      return this._count;
    }

    get realtimeMode() {
      return this._realtimeMode;
    }

    get state() {
      return this._state;
    }

    open() {
      if (this._isOpen() || !this._rendered) return;
      const panel = this._$(".panel");
      panel.hidden = false;
      // Open towards the side with room: under the bell's right edge by default, its left edge near the left.
      const align = this.getAttribute("align");
      panel.classList.remove("start");
      const room = this.getBoundingClientRect().right - panel.offsetWidth;
      if (align === "start" || (align !== "end" && room < 8)) panel.classList.add("start");
      this._$(".bell").setAttribute("aria-expanded", "true");
      document.addEventListener("pointerdown", this._onDocumentPointer, true);
      this._$(".panel").focus();
      this._emit("notifier-open-change", { open: true });
      this._updatePreferencesLink();
      if (this._state === "ready") this._showView(this._view, { reload: true });
      this._renderTimes();
      this._clock = window.setInterval(() => this._renderTimes(), 60_000); // "2 minutes ago" keeps up while open
    }

    close({ focusBell = false } = {}) {
      if (!this._isOpen()) return;
      this._$(".panel").hidden = true;
      this._$(".bell").setAttribute("aria-expanded", "false");
      window.clearInterval(this._clock);
      document.removeEventListener("pointerdown", this._onDocumentPointer, true);
      if (focusBell) this._$(".bell").focus();
      this._emit("notifier-open-change", { open: false });
    }

    toggle() {
      if (this._isOpen()) this.close();
      else this.open();
    }

    refresh() {
      this._restart();
    }

    // ---- lifecycle ---------------------------------------------------------------------------------------

    connectedCallback() {
      if (!this._rendered) this._render();
      document.addEventListener("visibilitychange", this._onVisibility);
      this._restart();
    }

    disconnectedCallback() {
      this.close();
      this._stop();
      document.removeEventListener("visibilitychange", this._onVisibility);
      document.removeEventListener("pointerdown", this._onDocumentPointer, true);
    }

    attributeChangedCallback(name, previous, value) {
      if (previous === value) return;
      if (name === "token") {
        this.token = value; // for frameworks that can only set attributes; the property is preferred
        return;
      }
      this._restart();
    }

    // ---- rendering ---------------------------------------------------------------------------------------

    _$(selector) {
      return this.shadowRoot.querySelector(selector);
    }

    _render() {
      const root = this.attachShadow({ mode: "open" });
      // A constructed sheet rather than a <style> element: it is not inline style, so a page's strict CSP allows it.
      if ("adoptedStyleSheets" in Document.prototype && "replaceSync" in CSSStyleSheet.prototype) {
        const sheet = new CSSStyleSheet();
        sheet.replaceSync(STYLES);
        root.adoptedStyleSheets = [sheet];
      } else {
        const style = document.createElement("style");
        style.textContent = STYLES;
        root.appendChild(style);
      }
      const holder = document.createElement("div");
      holder.innerHTML = TEMPLATE; // a constant: no data is ever inserted as HTML
      root.append(...holder.childNodes);
      this._rendered = true;
      this._renderStatic();

      this._$(".bell").addEventListener("click", () => this.toggle());
      this._$(".panel").addEventListener("keydown", (event) => {
        if (event.key === "Escape") {
          event.stopPropagation();
          this.close({ focusBell: true });
        }
      });
      this._$(".mark-all").addEventListener("click", () => this._markAllRead());
      for (const tab of this.shadowRoot.querySelectorAll(".tab")) {
        tab.addEventListener("click", () => this._showView(tab.id === "tab-archived" ? "archived" : "inbox"));
        tab.addEventListener("keydown", (event) => this._onTabKey(event));
      }
      this._$(".more").addEventListener("click", () => this._loadMore());
      this._$(".retry").addEventListener("click", () => this._restart());
      this._$(".prefs").addEventListener("click", () => this._updatePreferencesLink());
      if ("IntersectionObserver" in window) {
        // Infinite scroll: the "Load more" button loads the next page by itself once it scrolls into view.
        this._observer = new IntersectionObserver(
          (entries) => {
            if (entries.some((entry) => entry.isIntersecting)) this._loadMore();
          },
          { root: this._$(".feed"), rootMargin: "80px" },
        );
        this._observer.observe(this._$(".more"));
      }
    }

    _renderStatic() {
      const s = this._strings;
      this._$("#heading").textContent = s.heading;
      this._$(".mark-all").textContent = s.markAllRead;
      this._$(".tabs").setAttribute("aria-label", s.views);
      this._$("#tab-inbox").textContent = s.inbox;
      this._$("#tab-archived").textContent = s.archived;
      this._$(".more").textContent = s.loadMore;
      this._$(".retry").textContent = s.retry;
      this._$(".prefs").textContent = s.preferences;
      this._renderBell();
    }

    _renderBell() {
      const s = this._strings;
      const bell = this._$(".bell");
      const badge = this._$(".badge");
      const usable = this._state === "ready" || this._state === "idle";
      const count = usable ? this._count || 0 : 0;
      badge.hidden = !usable || !count;
      badge.textContent = count > 99 ? "99+" : String(count);
      let label = s.bell;
      if (!usable) label = `${s.bellUnavailable}`;
      else if (this._count !== null) label = count ? s.bellUnread(count) : s.bellNone;
      bell.setAttribute("aria-label", label);
    }

    _announce(text) {
      const region = this._$('[role="status"]');
      region.textContent = "";
      // A new text node after a tick makes screen readers announce even a repeated message.
      window.setTimeout(() => {
        region.textContent = text;
      }, 50);
    }

    _showNotice(text, { retry = false } = {}) {
      const notice = this._$(".notice");
      this._$(".notice-text").textContent = text;
      this._$(".retry").hidden = !retry;
      notice.hidden = false;
    }

    _clearNotice() {
      this._$(".notice").hidden = true;
    }

    _renderState() {
      const usable = this._state === "ready";
      for (const selector of [".tabs", ".feed", ".mark-all", ".footer"]) this._$(selector).hidden = !usable;
      if (this._state === "expired") this._showNotice(this._strings.expired);
      else if (this._state === "forbidden") this._showNotice(this._strings.forbidden);
      else if (this._state === "signed-out") this._showNotice(this._strings.signedOut);
      else this._clearNotice();
      this._renderBell();
    }

    _renderList() {
      const view = this._views[this._view];
      const list = this._$(".list");
      const active = this.shadowRoot.activeElement;
      const focusId = active && active.closest(".item") ? active.closest(".item").dataset.id : null;
      const focusKind = active ? active.dataset.kind : null;
      list.replaceChildren(...view.items.map((item) => this._renderItem(item)));
      const s = this._strings;
      const empty = this._$(".empty");
      empty.textContent = this._view === "archived" ? s.emptyArchived : s.emptyInbox;
      empty.hidden = !view.loaded || view.items.length > 0;
      const loading = this._$(".status-line");
      loading.textContent = s.loading;
      loading.hidden = !view.loading;
      this._$(".feed").setAttribute("aria-busy", view.loading ? "true" : "false");
      this._$(".more").hidden = !view.cursor || view.loading;
      this._$(".mark-all").disabled = !this._count;
      if (focusId) {
        // Keep focus where it was: the same control, its toggled twin (read <-> unread), the row, else the dialog.
        const row = list.querySelector(`.item[data-id="${CSS_ESCAPE(focusId)}"]`);
        const twin = { read: "unread", unread: "read" }[focusKind];
        const again =
          row &&
          (row.querySelector(`[data-kind="${focusKind}"]`) ||
            (twin && row.querySelector(`[data-kind="${twin}"]`)) ||
            row.querySelector('[data-kind="open"]'));
        if (again) again.focus();
        else this._$(".panel").focus();
      }
      this._renderTimes();
    }

    _renderItem(item) {
      const s = this._strings;
      const unread = !item.read_at;
      const li = document.createElement("li");
      li.className = `item${unread ? " unread" : ""}`;
      li.dataset.id = item.id;
      li.setAttribute("part", unread ? "item item-unread" : "item");

      const open = document.createElement("button");
      open.type = "button";
      open.className = "open";
      open.dataset.kind = "open";
      open.setAttribute("part", "item-button");
      const dot = document.createElement("span");
      dot.className = "dot";
      dot.setAttribute("part", "unread-dot");
      dot.setAttribute("aria-hidden", "true");
      open.appendChild(dot);
      const title = document.createElement("span");
      title.className = "title";
      title.setAttribute("part", "item-title");
      if (unread) {
        const marker = document.createElement("span");
        marker.className = "sr";
        marker.textContent = `${s.unread}: `;
        title.appendChild(marker);
      }
      title.appendChild(document.createTextNode(item.title || ""));
      open.appendChild(title);
      if (item.body) {
        const body = document.createElement("span");
        body.className = "body";
        body.setAttribute("part", "item-body");
        body.textContent = ` ${item.body}`;
        open.appendChild(body);
      }
      const time = document.createElement("time");
      time.className = "time";
      time.setAttribute("part", "item-time");
      time.dateTime = item.created_at;
      open.appendChild(time);
      open.addEventListener("click", () => this._activate(item.id));
      li.appendChild(open);

      const actions = document.createElement("div");
      actions.className = "actions";
      actions.setAttribute("part", "item-actions");
      actions.appendChild(this._actionButton(unread ? "read" : "unread", unread ? s.markRead : s.markUnread, item));
      if (this._view === "inbox") actions.appendChild(this._actionButton("archive", s.archive, item));
      li.appendChild(actions);
      return li;
    }

    _actionButton(kind, text, item) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "link-button";
      button.dataset.kind = kind;
      button.setAttribute("part", `item-action item-action-${kind}`);
      button.textContent = text;
      const context = document.createElement("span");
      context.className = "sr";
      context.textContent = ` (${item.title || ""})`; // the visible text stays the start of the accessible name
      button.appendChild(context);
      button.addEventListener("click", () => this._update(item.id, kind));
      return button;
    }

    _renderTimes() {
      const lang = this.getAttribute("lang") || document.documentElement.lang || navigator.language || "en";
      let format;
      try {
        format = new Intl.RelativeTimeFormat(lang, { numeric: "auto" });
      } catch (error) {
        format = new Intl.RelativeTimeFormat("en", { numeric: "auto" });
      }
      const now = Date.now();
      for (const time of this.shadowRoot.querySelectorAll("time")) {
        const then = Date.parse(time.dateTime);
        if (Number.isNaN(then)) continue;
        const seconds = Math.round((then - now) / 1000);
        const units = [["year", 31536000], ["month", 2592000], ["week", 604800], ["day", 86400], ["hour", 3600], ["minute", 60]];
        const [unit, size] = units.find(([, size]) => Math.abs(seconds) >= size) || ["second", 1];
        time.textContent = Math.abs(seconds) < 45 ? format.format(0, "second") : format.format(Math.round(seconds / size), unit);
        time.title = new Date(then).toLocaleString(lang);
      }
    }

    _onTabKey(event) {
      const tabs = [...this.shadowRoot.querySelectorAll(".tab")];
      const index = tabs.indexOf(event.currentTarget);
      const target = { ArrowRight: index + 1, ArrowLeft: index - 1, Home: 0, End: tabs.length - 1 }[event.key];
      if (target === undefined) return;
      event.preventDefault();
      const next = tabs[(target + tabs.length) % tabs.length];
      next.focus();
      this._showView(next.id === "tab-archived" ? "archived" : "inbox");
    }

    _updatePreferencesLink() {
      const link = this._$(".prefs");
      const configured = this.getAttribute("preferences-url");
      if (configured === "") {
        link.parentElement.hidden = true; // the host said: no link
        return;
      }
      const href = configured
        ? safeHref(configured)
        : this._token
          ? `${this.baseUrl}/preferences#token=${encodeURIComponent(this._token)}`
          : null;
      if (href) link.href = href;
      else link.removeAttribute("href");
    }

    // ---- state -------------------------------------------------------------------------------------------

    _emptyView() {
      return { items: [], cursor: null, loaded: false, loading: false };
    }

    _isOpen() {
      return this._rendered && !this._$(".panel").hidden;
    }

    _emit(name, detail, { cancelable = false } = {}) {
      return this.dispatchEvent(new CustomEvent(name, { detail, bubbles: true, composed: true, cancelable }));
    }

    _setCount(count, { announce = true } = {}) {
      const previous = this._count;
      this._count = Math.max(0, count);
      this._renderBell();
      if (this._rendered) this._$(".mark-all").disabled = !this._count;
      if (previous !== this._count) {
        if (announce && previous !== null) this._announce(this._strings.countAnnouncement(this._count));
        this._emit("notifier-unread-count", { count: this._count });
      }
    }

    _setRealtimeMode(mode) {
      if (this._realtimeMode === mode) return;
      this._realtimeMode = mode;
      this._emit("notifier-realtime", { mode });
    }

    _later(delaySeconds, callback) {
      const timer = window.setTimeout(() => {
        this._timers.delete(timer);
        callback();
      }, delaySeconds * 1000);
      this._timers.add(timer);
      return timer;
    }

    _stop() {
      this._generation += 1;
      for (const timer of this._timers) window.clearTimeout(timer);
      this._timers.clear();
      if (this._source) this._source.close();
      this._source = null;
      if (this._channel) this._channel.close();
      this._channel = null;
      this._setRealtimeMode("off");
    }

    _restart() {
      if (!this.isConnected || !this._rendered) return;
      this._stop();
      this._views = { inbox: this._emptyView(), archived: this._emptyView() };
      this._known = new Set();
      this._count = null;
      this._lastEventId = null;
      this._reconnectDelay = 1;
      this._pollDelay = null;
      this._renderList();
      if (!this._token && !this._tokenProvider) {
        this._state = "signed-out";
        this._renderState();
        return;
      }
      this._state = "idle";
      this._renderState();
      this._start(this._generation);
    }

    async _start(generation, delay = 1) {
      try {
        await this._refreshCount();
      } catch (error) {
        // An auth failure has set its state; anything else (offline, 5xx) is tried again, less and less often.
        if (!(error instanceof AuthFailure) && generation === this._generation) {
          this._later(delay, () => this._start(generation, Math.min(delay * 2, MAX_RECONNECT_SECONDS)));
        }
        return;
      }
      if (generation !== this._generation) return;
      this._state = "ready";
      this._renderState();
      this._updatePreferencesLink();
      this._listenToOtherTabs();
      if (this._isOpen()) this._showView(this._view, { reload: true });
      this._connectRealtime(generation);
    }

    _authFailed(status) {
      if (this._state === "expired" || this._state === "forbidden") return;
      this._stop();
      this._state = status === 403 ? "forbidden" : "expired";
      this._views = { inbox: this._emptyView(), archived: this._emptyView() };
      this._count = null;
      this._renderList();
      this._renderState();
      this._emit("notifier-auth-error", { status });
    }

    // ---- HTTP --------------------------------------------------------------------------------------------

    async _currentToken({ fresh = false } = {}) {
      const claims = this._token ? claimsOf(this._token) : {};
      const stale = !this._token || (claims.exp && claims.exp * 1000 - Date.now() < TOKEN_EXPIRY_MARGIN_MS);
      if ((fresh || stale) && this._tokenProvider) {
        const token = await this._tokenProvider();
        if (token) this._token = String(token);
      }
      return this._token;
    }

    async _api(method, suffix, { retried = false } = {}) {
      const user = this.userId;
      const token = await this._currentToken({ fresh: retried });
      if (!token || !user) {
        this._authFailed(401);
        throw new AuthFailure(401);
      }
      const response = await fetch(`${this.baseUrl}/v1/users/${encodeURIComponent(user)}/inbox${suffix}`, {
        method,
        headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
        cache: "no-store",
        credentials: "omit",
        referrerPolicy: "no-referrer",
      });
      if (response.status === 401 && !retried && this._tokenProvider) return this._api(method, suffix, { retried: true });
      if (response.status === 401 || response.status === 403) {
        this._authFailed(response.status);
        throw new AuthFailure(response.status);
      }
      if (!response.ok) throw new HttpFailure(response.status);
      return response.json();
    }

    async _refreshCount() {
      // An announcement that arrives while the count is being asked for was counted here already, and the
      // answer may have been read before its item was stored: applied, it would take the badge back down.
      // Then ask again (a few times at most, so a steady stream of announcements cannot keep us asking).
      for (let attempt = 1; ; attempt += 1) {
        const arrivals = this._arrivals;
        const page = await this._api("GET", "?status=unread&limit=1");
        if (arrivals === this._arrivals || attempt === 3) {
          this._setCount(page.unread_count);
          return page.unread_count;
        }
      }
    }

    // ---- the feed ----------------------------------------------------------------------------------------

    _query(view, cursor) {
      const size = Math.min(Math.max(parseInt(this.getAttribute("page-size") || "20", 10) || 20, 1), 100);
      const archived = view === "archived" ? "true" : "false";
      return `?status=all&archived=${archived}&limit=${size}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`;
    }

    async _showView(view, { reload = false } = {}) {
      this._view = view;
      for (const tab of this.shadowRoot.querySelectorAll(".tab")) {
        const selected = (tab.id === "tab-archived") === (view === "archived");
        tab.setAttribute("aria-selected", selected ? "true" : "false");
        tab.tabIndex = selected ? 0 : -1;
      }
      this._$(".feed").setAttribute("aria-labelledby", view === "archived" ? "tab-archived" : "tab-inbox");
      if (reload || !this._views[view].loaded) await this._loadFirstPage(view);
      else this._renderList();
    }

    async _loadFirstPage(view) {
      const generation = this._generation;
      const state = this._views[view];
      state.loading = true;
      this._renderList();
      try {
        const page = await this._api("GET", this._query(view, null));
        if (generation !== this._generation) return;
        this._views[view] = { items: page.data, cursor: page.next_cursor, loaded: true, loading: false };
        for (const item of page.data) this._known.add(item.id);
        if (view === "inbox") this._setCount(page.unread_count);
        this._clearNotice();
        if (view === "inbox" && this.getAttribute("read-on") === "open" && this._isOpen()) this._readShown();
      } catch (error) {
        if (generation !== this._generation || error instanceof AuthFailure) return;
        state.loading = false;
        this._showNotice(this._strings.failed, { retry: true });
      }
      if (view === this._view) this._renderList();
    }

    async _loadMore() {
      const view = this._view;
      const state = this._views[view];
      if (!state.cursor || state.loading || this._state !== "ready") return;
      const generation = this._generation;
      state.loading = true;
      this._renderList();
      try {
        const page = await this._api("GET", this._query(view, state.cursor));
        if (generation !== this._generation) return;
        const fresh = page.data.filter((item) => !state.items.some((known) => known.id === item.id));
        state.items = state.items.concat(fresh);
        state.cursor = page.next_cursor;
        for (const item of fresh) this._known.add(item.id);
      } catch (error) {
        if (generation !== this._generation || error instanceof AuthFailure) return;
        this._showNotice(this._strings.failed, { retry: true });
      } finally {
        state.loading = false;
      }
      if (view === this._view) this._renderList();
    }

    _findItem(id) {
      for (const view of Object.values(this._views)) {
        const item = view.items.find((candidate) => candidate.id === id);
        if (item) return item;
      }
      return null;
    }

    // Put a changed item (from our API answer or another tab) into every view that holds it.
    _applyItem(changed) {
      for (const [name, view] of Object.entries(this._views)) {
        const index = view.items.findIndex((item) => item.id === changed.id);
        if (index === -1) continue;
        if (name === "inbox" && changed.archived_at) {
          view.items.splice(index, 1);
          this._views.archived.loaded = false; // it has a new member; fetched when next shown
        } else view.items[index] = { ...view.items[index], ...changed };
      }
      this._renderList();
    }

    async _activate(id) {
      const item = this._findItem(id);
      if (!item) return;
      if (!item.read_at) await this._update(id, "read");
      const proceed = this._emit("notifier-message-click", { message: item }, { cancelable: true });
      const href = item.action_url ? safeHref(item.action_url) : null;
      if (proceed && href) window.location.assign(href);
    }

    // `counted: false` leaves the unread count to the caller: answers to concurrent updates may arrive in any
    // order, and each one's count is only true as of its own write.
    async _update(id, action, { counted = true } = {}) {
      const item = this._findItem(id);
      if (!item) return;
      const generation = this._generation;
      try {
        const answer = await this._api("POST", `/${encodeURIComponent(id)}/${action}`);
        if (generation !== this._generation) return;
        const { unread_count: count, ...changed } = answer;
        this._applyItem(changed);
        if (counted) this._setCount(count);
        this._broadcast({ type: "item", item: changed, count: counted ? count : null });
        if (action === "archive") {
          this._announce(this._strings.archivedOne);
          this._$(".panel").focus(); // its row is gone; keep focus inside the dialog
        }
      } catch (error) {
        if (!(error instanceof AuthFailure)) this._showNotice(this._strings.actionFailed);
      }
    }

    async _readShown() {
      const unread = this._views.inbox.items.filter((item) => !item.read_at);
      if (!unread.length) return;
      const generation = this._generation;
      await Promise.all(unread.map((item) => this._update(item.id, "read", { counted: false })));
      if (generation !== this._generation) return;
      try {
        const count = await this._refreshCount(); // asked after every read has been answered
        this._broadcast({ type: "count", count });
      } catch (error) {
        if (!(error instanceof AuthFailure)) this._showNotice(this._strings.actionFailed);
      }
    }

    async _markAllRead() {
      const generation = this._generation;
      try {
        const answer = await this._api("POST", "/read-all");
        if (generation !== this._generation) return;
        this._markAllLocally(new Date().toISOString());
        this._setCount(answer.unread_count, { announce: false });
        this._announce(this._strings.allRead);
        this._broadcast({ type: "read-all", count: answer.unread_count });
      } catch (error) {
        if (!(error instanceof AuthFailure)) this._showNotice(this._strings.actionFailed);
      }
    }

    _markAllLocally(when) {
      for (const view of Object.values(this._views)) {
        view.items = view.items.map((item) => (item.read_at || item.archived_at ? item : { ...item, read_at: when }));
      }
      this._renderList();
    }

    _received(item) {
      if (!item || !item.id || this._known.has(item.id)) return; // Ably may repeat an announcement
      this._known.add(item.id);
      const inbox = this._views.inbox;
      if (inbox.loaded && !item.archived_at) {
        inbox.items = [item, ...inbox.items];
        if (this._view === "inbox") this._renderList();
      }
      if (!item.read_at && !item.archived_at) {
        this._arrivals += 1;
        this._setCount((this._count || 0) + 1, { announce: false });
      }
      this._announce(`${this._strings.newAnnouncement(item.title || "")}. ${this._strings.countAnnouncement(this._count || 0)}`);
      this._emit("notifier-message", { message: item });
    }

    // ---- other tabs --------------------------------------------------------------------------------------

    // Tabs of one origin showing one user's inbox tell each other what they changed (BroadcastChannel): a read
    // in one shows in the others at once. Other devices catch up on their next count refresh.
    _listenToOtherTabs() {
      if (!("BroadcastChannel" in window) || this._channel) return;
      this._channel = new BroadcastChannel(`notifier-inbox|${this.baseUrl}|${this.userId}`);
      this._channel.onmessage = (event) => {
        const message = event.data || {};
        if (message.type === "item" && message.item) {
          this._known.add(message.item.id);
          this._applyItem(message.item);
          if (typeof message.count === "number") this._setCount(message.count);
        } else if (message.type === "count" && typeof message.count === "number") {
          this._setCount(message.count);
        } else if (message.type === "read-all") {
          this._markAllLocally(new Date().toISOString());
          this._setCount(message.count);
        }
      };
    }

    _broadcast(message) {
      if (this._channel) this._channel.postMessage(message);
    }

    // ---- realtime ----------------------------------------------------------------------------------------

    async _connectRealtime(generation) {
      let grant;
      try {
        grant = await this._api("POST", "/realtime-token");
      } catch (error) {
        if (generation !== this._generation || error instanceof AuthFailure) return;
        this._startPolling(generation);
        this._scheduleReconnect(generation);
        return;
      }
      if (generation !== this._generation) return;
      if (grant.mode !== "ably") {
        this._startPolling(generation);
        return;
      }
      let token;
      try {
        const response = await fetch(grant.token_url, {
          method: "POST",
          headers: { "Content-Type": "application/json", Accept: "application/json" },
          body: JSON.stringify(grant.token_request),
          credentials: "omit",
          cache: "no-store",
        });
        if (!response.ok) throw new HttpFailure(response.status);
        token = (await response.json()).token;
      } catch (error) {
        if (generation !== this._generation) return;
        this._startPolling(generation);
        this._scheduleReconnect(generation);
        return;
      }
      if (generation !== this._generation) return;
      this._openStream(generation, grant, token);
    }

    _openStream(generation, grant, token) {
      let url = `${grant.sse_url}&accessToken=${encodeURIComponent(token)}`;
      if (this._lastEventId) url += `&lastEvent=${encodeURIComponent(this._lastEventId)}`; // resume, do not skip
      const source = new EventSource(url);
      this._source = source;
      source.addEventListener("open", () => {
        if (generation !== this._generation) return;
        this._reconnectDelay = 1;
        this._stopPolling();
        this._setRealtimeMode("ably");
        this._refreshCount().catch(() => {}); // whatever arrived while we were not listening
      });
      source.addEventListener("message", (event) => {
        if (generation !== this._generation) return;
        if (event.lastEventId) this._lastEventId = event.lastEventId;
        try {
          const message = JSON.parse(event.data);
          this._received(decodeAblyData(message.data, message.encoding));
        } catch (error) {
          // not an inbox message: ignore it rather than break the stream
        }
      });
      source.addEventListener("error", (event) => {
        if (generation !== this._generation) return;
        let ablyError = null;
        if (event.data) {
          try {
            ablyError = JSON.parse(event.data);
          } catch (error) {
            ablyError = null;
          }
        }
        const tokenProblem = ablyError && ablyError.code >= 40140 && ablyError.code < 40150;
        if (ablyError || source.readyState === EventSource.CLOSED) {
          // Ably ended the stream (its token expired) or refused it: a new token, then resume where we were.
          source.close();
          if (this._source === source) this._source = null;
          if (tokenProblem) this._connectRealtime(generation);
          else {
            this._startPolling(generation);
            this._scheduleReconnect(generation);
          }
        }
        // readyState CONNECTING: the browser reconnects by itself with the same (still valid) token.
      });
    }

    _scheduleReconnect(generation) {
      const delay = this._reconnectDelay;
      this._reconnectDelay = Math.min(this._reconnectDelay * 2, MAX_RECONNECT_SECONDS);
      this._later(delay, () => {
        if (generation === this._generation && !this._source) this._connectRealtime(generation);
      });
    }

    _basePollSeconds() {
      return Math.max(parseFloat(this.getAttribute("poll-interval") || "30") || 30, 1);
    }

    _startPolling(generation) {
      if (this._pollDelay !== null || generation !== this._generation) return;
      this._setRealtimeMode("polling");
      this._pollDelay = this._basePollSeconds();
      this._schedulePoll(this._pollDelay);
    }

    _stopPolling() {
      this._pollDelay = null;
      if (this._pollTimer) window.clearTimeout(this._pollTimer);
      this._timers.delete(this._pollTimer);
      this._pollTimer = null;
    }

    _schedulePoll(delay) {
      if (this._pollDelay === null) return;
      if (this._pollTimer) {
        window.clearTimeout(this._pollTimer);
        this._timers.delete(this._pollTimer);
      }
      const generation = this._generation;
      this._pollTimer = this._later(delay, () => this._poll(generation));
    }

    // Poll the unread count: back to the base interval when it changed, slower while it does not (up to 8x), and
    // slower still after errors (doubling, at most 5 minutes). A hidden tab is not polled; it catches up when shown.
    async _poll(generation) {
      if (generation !== this._generation || this._pollDelay === null) return;
      const base = this._basePollSeconds();
      if (document.visibilityState === "hidden") {
        this._schedulePoll(this._pollDelay);
        return;
      }
      const before = this._count;
      try {
        const count = await this._refreshCount();
        if (generation !== this._generation || this._pollDelay === null) return;
        if (count !== before) {
          this._pollDelay = base;
          if (this._views.inbox.loaded) await this._loadFirstPage("inbox");
        } else this._pollDelay = Math.min(this._pollDelay * 1.5, base * 8, MAX_POLL_SECONDS);
      } catch (error) {
        if (error instanceof AuthFailure || generation !== this._generation) return;
        this._pollDelay = Math.min(this._pollDelay * 2, MAX_POLL_SECONDS);
      }
      this._schedulePoll(this._pollDelay);
    }
  }

  const CSS_ESCAPE = (value) =>
    window.CSS && window.CSS.escape ? window.CSS.escape(value) : String(value).replace(/["\\]/g, "\\$&");

  window.customElements.define("notifier-inbox", NotifierInbox);
})();
