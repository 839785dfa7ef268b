"""MLflow's Model Registry over its REST API (`/api/2.0/mlflow/...`), with aiohttp.

The broker never imports mlflow itself (its pins clash with ours, and five REST calls
need none of it). Connection trouble, timeouts and 5xx become `RegistryUnavailable`,
MLflow's own refusals `RegistryRefused` with its error code: here and nowhere else.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from extproc.rollout.releases import RegistryRefused, RegistryUnavailable, RegistryVersion

API = "/api/2.0/mlflow"


class MlflowRegistry:
    """One tracking server; every call has the source's time budget (fail: the caller keeps what it serves)."""

    def __init__(self, tracking_uri: str, timeout_ms: int) -> None:
        self._base = tracking_uri.rstrip("/") + API
        self._session = aiohttp.ClientSession(
            # A connection per call: polls are seconds apart, longer than the server keeps an idle
            # connection (uvicorn: 5 s), and a write on one it just closed fails as "disconnected".
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=timeout_ms / 1000),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def _call(self, method: str, path: str, *, params: dict[str, str] | None = None, body: Any = None) -> Any:
        try:
            async with self._session.request(method, self._base + path, params=params, json=body) as resp:
                text = await resp.text()
                if resp.status >= 500:
                    raise RegistryUnavailable(f"MLflow answered {resp.status} to {method} {path}")
                try:
                    doc = await resp.json(content_type=None)
                except ValueError:
                    raise RegistryUnavailable(f"MLflow answered {resp.status} without JSON: {text[:200]!r}") from None
                if resp.status >= 400:
                    error = doc if isinstance(doc, dict) else {}
                    raise RegistryRefused(str(error.get("error_code", resp.status)), str(error.get("message", text)))
                return doc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise RegistryUnavailable(f"{method} {path}: {str(exc) or type(exc).__name__}") from None

    async def aliases(self, name: str) -> dict[str, int]:
        """alias → version number of one registered model."""
        doc = await self._call("GET", "/registered-models/get", params={"name": name})
        found = doc.get("registered_model", {}).get("aliases", [])
        return {str(a["alias"]): int(a["version"]) for a in found}

    async def version(self, name: str, number: int) -> RegistryVersion:
        doc = await self._call("GET", "/model-versions/get", params={"name": name, "version": str(number)})
        found = doc.get("model_version", {})
        tags = {str(t["key"]): str(t.get("value", "")) for t in found.get("tags", [])}
        return RegistryVersion(int(found.get("version", number)), str(found.get("status", "")), tags)

    async def set_alias(self, name: str, alias: str, number: int) -> None:
        await self._call(
            "POST", "/registered-models/alias", body={"name": name, "alias": alias, "version": str(number)}
        )

    async def delete_alias(self, name: str, alias: str) -> None:
        await self._call("DELETE", "/registered-models/alias", body={"name": name, "alias": alias})

    async def set_tag(self, name: str, number: int, key: str, value: str) -> None:
        body = {"name": name, "version": str(number), "key": key, "value": value}
        await self._call("POST", "/model-versions/set-tag", body=body)

    async def close(self) -> None:
        await self._session.close()
