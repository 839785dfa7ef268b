"""Holding an audited response until its record is spooled, with one ext_proc message instead of two.

Audited routes send the broker the response body only; the status and the serving
version come with it as response attributes. On its own that would let Envoy pass
the response headers downstream while the broker is still writing the record
(measured on 1.40: the status reaches the client at once, the body when the broker
answers). This Lua filter sits before ext_proc in the chain, so on the way out it
sees the response after ext_proc; asking for the whole body holds the headers until
ext_proc releases the body, that is until the record is on disk. It costs Envoy
less than the response-headers message it replaces costs both sides (README, Audit).
Off in the chain, on per audited route.
"""

from __future__ import annotations

from envoy_data_plane.envoy.config.core.v3 import DataSource
from envoy_data_plane.envoy.config.route.v3 import FilterConfig
from envoy_data_plane.envoy.extensions.filters.http.lua.v3 import Lua, LuaPerRoute
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpFilter
from envoy_data_plane.google.protobuf import Any as AnyMessage

from extproc.envoy.common import AUDIT_HOLD_FILTER, _any

# `body()` suspends the script, and with it the headers, until the last byte has passed ext_proc.
# ext_proc dropped `content-length` (a body phase without a header phase could have changed the
# body); the hold knows the final body, so it restores it and clients get no chunked encoding.
HOLD_SCRIPT = "hold"
HOLD_LUA = """function envoy_on_response(response)
  local body = response:body()
  if body ~= nil then
    response:headers():replace("content-length", tostring(body:length()))
  end
end
"""


def audit_hold_filter() -> HttpFilter:
    """The hold, in the chain before ext_proc; disabled until an audited route switches it on."""
    lua = Lua(source_codes={HOLD_SCRIPT: DataSource(inline_string=HOLD_LUA)})
    return HttpFilter(name=AUDIT_HOLD_FILTER, typed_config=_any(lua), disabled=True)


def audit_hold_on() -> AnyMessage:
    """Switch the hold on for one (audited) route."""
    return _any(FilterConfig(config=_any(LuaPerRoute(name=HOLD_SCRIPT))))
