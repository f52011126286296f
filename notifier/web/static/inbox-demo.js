// The inbox demo page: sends the shown user a test notification without leaving the page (so it arrives in the
// component as it would in a product), and shows where a clicked message would lead instead of navigating there.
"use strict";

(() => {
  const form = document.getElementById("send");
  const status = document.getElementById("send-status");
  const inbox = document.getElementById("inbox");
  if (!form || !inbox) return;

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button");
    button.disabled = true;
    status.textContent = "Sending…";
    try {
      const response = await fetch(form.action, {
        method: "POST",
        body: new URLSearchParams(new FormData(form)),
        credentials: "omit",
      });
      if (response.status === 202) status.textContent = "Sent. Watch the bell.";
      else if (response.status === 401) status.textContent = "This demo page has expired: sign in again.";
      else status.textContent = `Not sent (HTTP ${response.status}).`;
    } catch (error) {
      status.textContent = "Not sent: the service could not be reached.";
    } finally {
      button.disabled = false;
    }
  });

  inbox.addEventListener("notifier-message-click", (event) => {
    const target = event.detail.message.action_url;
    if (target) {
      event.preventDefault(); // the product's paths do not exist on notifier
      status.textContent = `In your product this would open ${target}.`;
    }
  });
})();
