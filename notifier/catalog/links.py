"""Action URLs on channels read outside the product.

The catalog's action URLs are usually relative (``/approvals/a3``): the in-app inbox runs on the product's own
pages and the push app resolves the URL in its data itself, so both keep that form. An email is read in a mail
client, where a relative link leads nowhere; there it is joined to the product's web address (``NOTIFIER_APP_URL``).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from notifier.types import ChannelName

READ_OUTSIDE_THE_PRODUCT = frozenset({ChannelName.email})
"""Channels whose messages are read where no page of the product can resolve a relative link."""


def action_url_on(channel: ChannelName, url: str | None, app_url: str) -> str | None:
    """The action URL as ``channel`` carries it: ``url`` made absolute against ``app_url`` on a channel read outside
    the product, else ``url`` as it is (also when ``app_url`` is empty: nothing to join it to)."""
    if channel not in READ_OUTSIDE_THE_PRODUCT or not app_url or not url:
        return url
    return absolute(url, app_url)


def absolute(url: str, app_url: str) -> str:
    """``url`` joined to ``app_url`` (an absolute http(s) URL without a trailing slash, as settings keep it).

    An absolute URL (any scheme: ``https:``, ``mailto:``, an app's own) is left alone. A path is appended to
    ``app_url``'s path, not put in its place as ``urljoin`` would: a product served under ``/app`` keeps it.
    """
    parts = urlsplit(url)
    if parts.scheme:
        return url
    if parts.netloc:  # scheme-relative (//host/path): only the scheme is missing
        return f"{urlsplit(app_url).scheme}:{url}"
    return app_url + (url if url.startswith("/") else "/" + url)


def is_relative(template: str) -> bool:
    """Whether an action URL template renders a relative URL whatever the data: it starts with literal text
    that is not an absolute URL. One that starts with a template tag (``{{ url }}``) may render either."""
    if template.lstrip().startswith(("{{", "{%", "{#")):
        return False
    parts = urlsplit(template.strip())
    return not parts.scheme and not parts.netloc
