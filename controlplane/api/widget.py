"""The connect widget: the page a user opens from a widget session to pick the service to connect.

Plain HTML with one link per provider (it works without JavaScript); a small script, allowed by a
per-response CSP nonce, filters the list as the user types. The page is served with a strict
Content-Security-Policy (nothing loads from elsewhere, no framing, no form posts), ``no-store`` and
``no-referrer``. Texts follow the session's ``language`` (``en``, ``de``, ``fr``, ``es``, ``it``, ``nl``;
other languages fall back to English).
"""

from __future__ import annotations

import html
import secrets
from collections.abc import Iterable

from fastapi.responses import HTMLResponse

TEXTS: dict[str, dict[str, str]] = {
    "en": {"title": "Connect a device", "intro": "Choose the service to connect.", "search": "Search services",
           "connect": "Connect {name}", "none": "No service matches your search.",
           "expired_title": "Session expired",
           "expired": "This connection link has expired. Please start again from the app that sent you here."},
    "de": {"title": "Gerät verbinden", "intro": "Wähle den Dienst, den du verbinden möchtest.",
           "search": "Dienste suchen", "connect": "{name} verbinden", "none": "Kein Dienst passt zu deiner Suche.",
           "expired_title": "Sitzung abgelaufen",
           "expired": "Dieser Link ist abgelaufen. Bitte starte erneut in der App, die dich hierher geschickt hat."},
    "fr": {"title": "Connecter un appareil", "intro": "Choisissez le service à connecter.",
           "search": "Rechercher un service", "connect": "Connecter {name}",
           "none": "Aucun service ne correspond à votre recherche.", "expired_title": "Session expirée",
           "expired": "Ce lien de connexion a expiré. Recommencez depuis l'application qui vous a envoyé ici."},
    "es": {"title": "Conectar un dispositivo", "intro": "Elige el servicio que quieres conectar.",
           "search": "Buscar servicios", "connect": "Conectar {name}",
           "none": "Ningún servicio coincide con tu búsqueda.", "expired_title": "Sesión caducada",
           "expired": "Este enlace ha caducado. Vuelve a empezar desde la aplicación que te envió aquí."},
    "it": {"title": "Collega un dispositivo", "intro": "Scegli il servizio da collegare.",
           "search": "Cerca servizi", "connect": "Collega {name}", "none": "Nessun servizio corrisponde alla ricerca.",
           "expired_title": "Sessione scaduta",
           "expired": "Questo link è scaduto. Ricomincia dall'app che ti ha mandato qui."},
    "nl": {"title": "Apparaat koppelen", "intro": "Kies de dienst die je wilt koppelen.",
           "search": "Diensten zoeken", "connect": "{name} koppelen", "none": "Geen dienst gevonden.",
           "expired_title": "Sessie verlopen",
           "expired": "Deze link is verlopen. Begin opnieuw in de app die je hierheen stuurde."},
}

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
main{max-width:28rem;margin:2rem auto;padding:1.5rem;background:#fff;border-radius:12px;
box-shadow:0 1px 4px rgba(0,0,0,.08)}
h1{font-size:1.4rem;margin:0 0 .5rem}
input{width:100%;box-sizing:border-box;padding:.6rem .75rem;margin:.75rem 0;border:1px solid #c9ced8;
border-radius:8px;font-size:1rem}
ul{list-style:none;padding:0;margin:0}
li a{display:block;padding:.8rem 1rem;margin:.4rem 0;border:1px solid #dfe3ea;border-radius:8px;color:inherit;
text-decoration:none;font-weight:600}
li a:hover,li a:focus{border-color:#3b6cf6;outline:none;background:#f0f4ff}
[hidden]{display:none}
"""

SCRIPT = """
const input = document.getElementById("filter");
const items = Array.from(document.querySelectorAll("#providers li"));
const none = document.getElementById("none");
input.hidden = false;
input.addEventListener("input", () => {
  const query = input.value.trim().toLowerCase();
  let shown = 0;
  for (const item of items) {
    const match = !query || item.dataset.name.includes(query);
    item.hidden = !match;
    shown += match ? 1 : 0;
  }
  none.hidden = shown > 0;
});
"""


def texts(language: str | None) -> dict[str, str]:
    """The page texts for ``language`` (``de``, ``de-AT`` and ``de_AT`` all give German), else English."""
    base = (language or "en").replace("_", "-").split("-")[0].lower()
    return TEXTS.get(base, TEXTS["en"])


def page(title: str, body: str, status: int = 200, lang: str | None = None, nonce: str | None = None,
         script: str = "") -> HTMLResponse:
    """A self-contained HTML page with the widget's security headers (styles and script only with ``nonce``)."""
    nonce = nonce or secrets.token_urlsafe(16)
    script_tag = f'<script nonce="{nonce}">{script}</script>' if script else ""
    return HTMLResponse(
        f'<!doctype html>\n<html lang="{html.escape(lang or "en")}"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
        f'<title>{html.escape(title)}</title>'
        f'<style nonce="{nonce}">{STYLE}</style></head>\n<body><main>\n<h1>{html.escape(title)}</h1>\n{body}\n'
        f"</main>{script_tag}</body></html>\n", status,
        headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                 "X-Content-Type-Options": "nosniff",
                 "Content-Security-Policy": f"default-src 'none'; style-src 'nonce-{nonce}'; script-src "
                                            f"'nonce-{nonce}'; img-src 'self' data:; base-uri 'none'; "
                                            "form-action 'none'; frame-ancestors 'none'"})


def widget_page(session_id: str, providers: Iterable[tuple[str, str]], language: str | None) -> HTMLResponse:
    """The provider list of one widget session; ``providers`` are ``(slug, display name)`` pairs."""
    text = texts(language)
    session = html.escape(session_id)
    items = "\n".join(
        f'<li data-name="{html.escape(name.lower())} {html.escape(slug)}"><a rel="nofollow" '
        f'href="/widget/session/{session}/connect/{html.escape(slug)}">'
        f'{html.escape(text["connect"].format(name=name))}</a></li>' for slug, name in providers)
    body = (f"<p>{html.escape(text['intro'])}</p>\n"
            f'<input id="filter" type="search" hidden autocomplete="off" aria-label="{html.escape(text["search"])}" '
            f'placeholder="{html.escape(text["search"])}">\n'
            f'<ul id="providers">\n{items}\n</ul>\n<p id="none" hidden>{html.escape(text["none"])}</p>')
    return page(text["title"], body, lang=language, script=SCRIPT)


def expired_page(language: str | None, status: int) -> HTMLResponse:
    text = texts(language)
    return page(text["expired_title"], f"<p>{html.escape(text['expired'])}</p>", status, lang=language)
