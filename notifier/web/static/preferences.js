// The preference center: reads the user's token from the URL fragment, then edits
// /v1/users/{sub}/preferences with Authorization: Bearer. No build step, no dependencies.
"use strict";

(() => {
  const CHANNELS = ["push", "email", "in_app"];
  const CHANNEL_LABELS = { push: "Push", email: "Email", in_app: "In-app" };
  const TOKEN_KEY = "notifier.preferences.token";
  const MERGE_PATCH = "application/merge-patch+json";
  const MESSAGES = {
    noToken: "This page needs your personal link. Open your notification settings from the app to get one.",
    expired: "This link has expired or is no longer valid. Open your notification settings from the app again to get a new link.",
    forbidden: "This link does not give access to these preferences.",
    stale: "Your preferences were changed elsewhere (in another tab or on another device) after this page loaded, " +
      "so nothing was saved. Reload to see the current settings, then make your change again.",
    network: "The notification service could not be reached. Check your connection and try again.",
  };

  const state = { token: null, userId: null, etag: null, doc: null, types: [], busy: false };
  const $ = (id) => document.getElementById(id);

  // ---- token -------------------------------------------------------------------------------

  function readToken() {
    const fragment = new URLSearchParams(window.location.hash.slice(1));
    let token = fragment.get("token");
    if (token) {
      try {
        sessionStorage.setItem(TOKEN_KEY, token); // survives a reload of this tab, gone when it closes
      } catch (error) {
        // storage disabled: the token lives in memory only
      }
      // Take the token out of the address bar so it is not bookmarked, shared or copied around.
      history.replaceState(null, "", window.location.pathname + window.location.search);
    } else {
      try {
        token = sessionStorage.getItem(TOKEN_KEY);
      } catch (error) {
        token = null;
      }
    }
    return token;
  }

  function forgetToken() {
    try {
      sessionStorage.removeItem(TOKEN_KEY);
    } catch (error) {
      // nothing stored
    }
  }

  function subjectOf(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const padded = part + "=".repeat((4 - (part.length % 4)) % 4);
      const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
      const claims = JSON.parse(new TextDecoder().decode(bytes));
      return typeof claims.sub === "string" && claims.sub ? claims.sub : null;
    } catch (error) {
      return null;
    }
  }

  // ---- API ---------------------------------------------------------------------------------

  async function api(method, suffix, options = {}) {
    const headers = { Authorization: `Bearer ${state.token}`, Accept: "application/json" };
    if (options.body !== undefined) headers["Content-Type"] = options.contentType || "application/json";
    if (options.ifMatch) headers["If-Match"] = options.ifMatch;
    const response = await fetch(`/v1/users/${encodeURIComponent(state.userId)}/preferences${suffix}`, {
      method,
      headers,
      body: options.body === undefined ? undefined : JSON.stringify(options.body),
      cache: "no-store",
      credentials: "omit",
      referrerPolicy: "no-referrer",
    });
    let data = null;
    try {
      data = await response.json();
    } catch (error) {
      data = null;
    }
    return { status: response.status, etag: response.headers.get("ETag"), data };
  }

  // ---- messages ----------------------------------------------------------------------------

  function announce(text) {
    $("status").textContent = text;
  }

  function showAlert(text, { reload = false } = {}) {
    $("alert-text").textContent = text;
    $("reload").hidden = !reload;
    $("alert").hidden = false;
  }

  function clearAlert() {
    $("alert").hidden = true;
    $("alert-text").textContent = "";
  }

  function handleFailure(result, action) {
    if (result.status === 401) {
      forgetToken();
      showAlert(MESSAGES.expired);
      announce(`${action} failed: the link has expired.`);
    } else if (result.status === 403) {
      showAlert(MESSAGES.forbidden);
    } else if (result.status === 412) {
      showAlert(MESSAGES.stale, { reload: true });
      announce(`${action} failed: the preferences were changed elsewhere.`);
    } else if (result.status === 422) {
      showFieldErrors((result.data && result.data.errors) || []);
      announce(`${action} failed: please correct the highlighted fields.`);
    } else {
      const detail = (result.data && (result.data.detail || result.data.title)) || `HTTP ${result.status}`;
      showAlert(`${action} failed: ${detail}. Please try again.`);
    }
  }

  function showFieldError(control, message) {
    const id = `${control.id}-error`;
    let note = $(id);
    if (!note) {
      note = document.createElement("span");
      note.id = id;
      note.className = "error field-error";
      (control.closest(".field, td") || control.parentElement).appendChild(note);
    }
    note.textContent = message;
    control.setAttribute("aria-invalid", "true");
    // The error comes first in the description, so it is what a screen reader says right after the label.
    const others = (control.getAttribute("aria-describedby") || "").split(/\s+/).filter((other) => other && other !== id);
    control.setAttribute("aria-describedby", [id, ...others].join(" "));
  }

  function clearErrors() {
    for (const control of document.querySelectorAll("[aria-invalid]")) {
      control.removeAttribute("aria-invalid");
      const rest = (control.getAttribute("aria-describedby") || "").split(/\s+/).filter((id) => id && id !== `${control.id}-error`);
      if (rest.length) control.setAttribute("aria-describedby", rest.join(" "));
      else control.removeAttribute("aria-describedby");
    }
    for (const note of document.querySelectorAll(".field-error")) note.remove();
    $("form-error").hidden = true;
    $("form-error").textContent = "";
  }

  function controlFor(loc) {
    const [section, first, second] = loc;
    if (section === "channels" && first) return $(`channel-${first}`);
    if (section === "quiet_hours") {
      return $({ start: "quiet-start", end: "quiet-end", timezone: "quiet-timezone" }[first] || "quiet-enabled");
    }
    if (section === "muted_until") return $("mute-hours");
    if (section === "event_types" && first && second) return $(`type-${first}-${second}`);
    if (section === "categories" && first && second) return $(`category-${first}-${second}`);
    return null;
  }

  function showFieldErrors(errors) {
    const unplaced = [];
    let first = null;
    for (const error of errors) {
      const control = controlFor(error.loc || []);
      if (control) {
        showFieldError(control, error.msg);
        first = first || control;
      } else {
        unplaced.push(`${(error.loc || []).join(".") || "document"}: ${error.msg}`);
      }
    }
    if (unplaced.length) {
      $("form-error").textContent = unplaced.join("; ");
      $("form-error").hidden = false;
    }
    if (first) first.focus();
  }

  // ---- the document ------------------------------------------------------------------------

  function documentFrom(data) {
    return {
      channels: { ...data.channels },
      categories: structuredClone(data.categories || {}),
      event_types: structuredClone(data.event_types || {}),
      quiet_hours: data.quiet_hours ? { ...data.quiet_hours } : null,
      muted_until: data.muted_until || null,
    };
  }

  function setNested(section, key, channel, value) {
    section[key] = { ...(section[key] || {}), [channel]: value };
  }

  function dropNested(section, key, channel) {
    if (!section[key]) return;
    delete section[key][channel];
    if (!Object.keys(section[key]).length) delete section[key];
  }

  function typeValue(type, channel) {
    const own = (state.doc.event_types[type.name] || {})[channel];
    if (own !== undefined) return own;
    const category = (state.doc.categories[type.category] || {})[channel];
    if (category !== undefined) return category;
    return type.channels[channel].baseline.enabled;
  }

  const isLocked = (type, channel) => type.critical && type.default_channels.includes(channel);
  const humanise = (name) => name.replace(/[._]/g, " ").replace(/^./, (c) => c.toUpperCase());

  function membersOf(category, channel) {
    return state.types.filter(
      (t) => t.category === category && t.allowed_channels.includes(channel) && !isLocked(t, channel),
    );
  }

  // ---- rendering ---------------------------------------------------------------------------

  function element(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (name === "text") node.textContent = value;
      else if (name === "className") node.className = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  function hiddenText(text) {
    return element("span", { className: "visually-hidden", text });
  }

  function toggle(id, label, { role = "switch", data = {} } = {}) {
    const input = element("input", { type: "checkbox", id });
    if (role) input.setAttribute("role", role);
    for (const [key, value] of Object.entries(data)) input.dataset[key] = value;
    return element("label", { className: "toggle" }, input, hiddenText(label));
  }

  function renderChannels() {
    const list = $("channels");
    list.replaceChildren();
    for (const channel of CHANNELS) {
      const input = element("input", { type: "checkbox", role: "switch", id: `channel-${channel}` });
      input.dataset.channel = channel;
      input.addEventListener("change", () => {
        state.doc.channels[channel] = input.checked;
        refresh();
      });
      const off = element("span", { className: "hint channel-off", id: `channel-off-${channel}`, hidden: "" });
      off.textContent = `${CHANNEL_LABELS[channel]} is off for everything except critical alerts.`;
      list.append(
        element("div", { className: "field field-inline" }, input,
          element("label", { for: input.id, text: `${CHANNEL_LABELS[channel]} notifications` }), off),
      );
    }
  }

  function renderMatrix() {
    const matrix = $("matrix");
    matrix.replaceChildren();
    const categories = [...new Set(state.types.map((t) => t.category))].sort();
    for (const category of categories) {
      const label = humanise(category);
      const head = element("tr", {}, element("th", { scope: "col" }, hiddenText("Notification")));
      for (const channel of CHANNELS) head.append(element("th", { scope: "col", text: CHANNEL_LABELS[channel] }));
      const body = element("tbody");
      const all = element("tr", { className: "category-row" }, element("th", { scope: "row", text: `All ${category}` }));
      for (const channel of CHANNELS) {
        if (!membersOf(category, channel).length) {
          all.append(notAvailable());
          continue;
        }
        const cell = toggle(`category-${category}-${channel}`, `${CHANNEL_LABELS[channel]} for all ${category}`, {
          role: null, data: { category, channel },
        });
        cell.querySelector("input").addEventListener("change", (event) => setCategory(category, channel, event.target.checked));
        all.append(element("td", { "data-column": channel }, cell));
      }
      body.append(all);
      for (const type of state.types.filter((t) => t.category === category)) body.append(typeRow(type));
      const table = element("table", { className: "matrix" }, element("thead", {}, head), body);
      matrix.append(element("fieldset", { className: "category", id: `category-${category}` },
        element("legend", { text: label }), table));
    }
  }

  function notAvailable() {
    return element("td", { className: "na" }, element("span", { "aria-hidden": "true", text: "—" }), hiddenText("Not used"));
  }

  function typeRow(type) {
    const title = humanise(type.name);
    const header = element("th", { scope: "row" }, element("span", { className: "type-name", text: title }));
    if (type.critical) header.append(element("span", { className: "badge", text: "Critical · always on" }));
    if (type.description) header.append(element("span", { className: "type-description", text: type.description }));
    const row = element("tr", {}, header);
    for (const channel of CHANNELS) {
      if (!type.allowed_channels.includes(channel)) {
        row.append(notAvailable());
        continue;
      }
      const locked = isLocked(type, channel);
      const label = `${CHANNEL_LABELS[channel]} for ${title}${locked ? " (critical, always on)" : ""}`;
      const cell = toggle(`type-${type.name}-${channel}`, label, { data: { type: type.name, channel } });
      const input = cell.querySelector("input");
      if (locked) {
        input.checked = true;
        input.disabled = true;
        input.setAttribute("aria-disabled", "true");
        input.dataset.locked = "true";
      } else {
        input.addEventListener("change", () => {
          setNested(state.doc.event_types, type.name, channel, input.checked);
          refresh();
        });
      }
      row.append(element("td", { "data-column": channel }, cell));
    }
    return row;
  }

  function setCategory(category, channel, value) {
    setNested(state.doc.categories, category, channel, value);
    // A category switch speaks for its whole row: per-type choices on this channel give way to it.
    for (const type of membersOf(category, channel)) dropNested(state.doc.event_types, type.name, channel);
    refresh();
  }

  function refresh() {
    for (const channel of CHANNELS) {
      const off = state.doc.channels[channel] === false;
      $(`channel-${channel}`).checked = !off;
      $(`channel-off-${channel}`).hidden = !off;
      for (const cell of document.querySelectorAll(`td[data-column="${channel}"]`)) {
        cell.classList.toggle("column-off", off);
        const input = cell.querySelector("input");
        if (off) input.setAttribute("aria-describedby", `channel-off-${channel}`);
        else if (input.getAttribute("aria-describedby") === `channel-off-${channel}`) input.removeAttribute("aria-describedby");
      }
    }
    for (const input of document.querySelectorAll("input[data-type]")) {
      if (input.dataset.locked) continue;
      const type = state.types.find((t) => t.name === input.dataset.type);
      input.checked = typeValue(type, input.dataset.channel);
    }
    for (const input of document.querySelectorAll("input[data-category]")) {
      const values = membersOf(input.dataset.category, input.dataset.channel).map((t) => typeValue(t, input.dataset.channel));
      input.checked = values.every(Boolean);
      input.indeterminate = !input.checked && values.some(Boolean);
    }
  }

  function browserZone() {
    try {
      return Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
    } catch (error) {
      return "UTC";
    }
  }

  function renderZones() {
    const zones = typeof Intl.supportedValuesOf === "function" ? Intl.supportedValuesOf("timeZone") : [browserZone()];
    $("timezones").replaceChildren(...zones.map((zone) => element("option", { value: zone })));
  }

  function renderQuietHours() {
    const quiet = state.doc.quiet_hours;
    $("quiet-enabled").checked = Boolean(quiet);
    $("quiet-start").value = quiet ? quiet.start : "22:00";
    $("quiet-end").value = quiet ? quiet.end : "07:00";
    $("quiet-timezone").value = quiet ? quiet.timezone || "" : browserZone();
    setQuietEnabled(Boolean(quiet));
  }

  function setQuietEnabled(enabled) {
    for (const id of ["quiet-start", "quiet-end", "quiet-timezone"]) $(id).disabled = !enabled;
  }

  function renderMute() {
    const until = state.doc.muted_until ? new Date(state.doc.muted_until) : null;
    const muted = until !== null && until > new Date();
    const when = muted ? until.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" }) : "";
    $("mute-state").textContent = muted ? `Push and email are muted until ${when}.` : "Push and email are not muted.";
    $("unmute").disabled = !muted;
  }

  function renderAll() {
    refresh();
    renderQuietHours();
    renderMute();
  }

  // ---- actions -----------------------------------------------------------------------------

  function buildDocument() {
    const quiet = $("quiet-enabled").checked
      ? { start: $("quiet-start").value, end: $("quiet-end").value, timezone: $("quiet-timezone").value.trim() || null }
      : null;
    return { ...state.doc, quiet_hours: quiet };
  }

  async function send(action, call) {
    if (state.busy) return null;
    state.busy = true;
    $("save").setAttribute("aria-disabled", "true");
    clearErrors();
    clearAlert();
    try {
      return await call();
    } catch (error) {
      showAlert(MESSAGES.network);
      announce(`${action} failed.`);
      return null;
    } finally {
      state.busy = false;
      $("save").removeAttribute("aria-disabled");
    }
  }

  async function save(event) {
    event.preventDefault();
    announce("Saving…");
    const result = await send("Saving", () => api("PUT", "", { body: buildDocument(), ifMatch: state.etag }));
    if (result === null) return;
    if (result.status !== 200) {
      handleFailure(result, "Saving");
      return;
    }
    state.etag = result.etag;
    state.doc = documentFrom(result.data);
    renderAll();
    announce("Your preferences are saved.");
  }

  async function patchMute(mutedUntil, action) {
    const result = await send(action, () =>
      api("PATCH", "", { body: { muted_until: mutedUntil }, contentType: MERGE_PATCH, ifMatch: state.etag }),
    );
    if (result === null) return;
    if (result.status !== 200) {
      handleFailure(result, action);
      return;
    }
    state.etag = result.etag;
    state.doc.muted_until = result.data.muted_until; // keep other unsaved edits on the page
    renderMute();
    announce($("mute-state").textContent);
  }

  function mute() {
    const hours = Number($("mute-hours").value);
    if (!Number.isInteger(hours) || hours < 1 || hours > 720) {
      clearErrors();
      showFieldError($("mute-hours"), "Enter a whole number of hours from 1 to 720.");
      $("mute-hours").focus();
      return;
    }
    patchMute(new Date(Date.now() + hours * 3600 * 1000).toISOString(), "Muting");
  }

  async function load() {
    $("app").setAttribute("aria-busy", "true");
    announce("Loading your preferences…");
    clearAlert();
    clearErrors();
    let results;
    try {
      results = await Promise.all([api("GET", ""), api("GET", "/effective")]);
    } catch (error) {
      showAlert(MESSAGES.network);
      return;
    } finally {
      $("app").setAttribute("aria-busy", "false");
    }
    const failed = results.find((r) => r.status !== 200);
    if (failed) {
      $("preferences").hidden = true;
      handleFailure(failed, "Loading");
      return;
    }
    const [preferences, effective] = results;
    state.etag = preferences.etag;
    state.doc = documentFrom(preferences.data);
    state.types = Object.entries(effective.data.event_types)
      .map(([name, type]) => ({ name, ...type }))
      .sort((a, b) => a.name.localeCompare(b.name));
    renderChannels();
    renderMatrix();
    renderAll();
    $("preferences").hidden = false;
    announce("Your preferences are loaded.");
  }

  function start() {
    state.token = readToken();
    state.userId = state.token ? subjectOf(state.token) : null;
    $("app").setAttribute("aria-busy", "false");
    if (!state.token) {
      showAlert(MESSAGES.noToken);
      return;
    }
    if (!state.userId) {
      forgetToken();
      showAlert(MESSAGES.expired);
      return;
    }
    renderZones();
    $("preferences").addEventListener("submit", save);
    $("quiet-enabled").addEventListener("change", (event) => setQuietEnabled(event.target.checked));
    $("mute").addEventListener("click", mute);
    $("unmute").addEventListener("click", () => patchMute(null, "Unmuting"));
    $("reload").addEventListener("click", load);
    load();
  }

  start();
})();
