"""The reference app under test: settings for a test's database, the app in-process behind an
httpx client, a user made through it, and a free port to serve it on over real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import URL

from dblayer.settings import Settings, get_settings


def settings_for(url: URL, **values: object) -> Settings:
    return get_settings(database_url=url.render_as_string(hide_password=False), **values)


async def client_for(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        # As a server would: an error after the response was sent is logged, not re-raised here.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client


async def new_user(client: httpx.AsyncClient, name: str = "ada") -> dict[str, Any]:
    response = await client.post(
        "/users",
        json={"email": f"{name}@example.com", "username": name, "password": "correct horse"},
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body
