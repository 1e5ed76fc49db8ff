"""The ``promote`` flow: move the ``champion`` alias to a registered version when its declared gates pass.

The decision itself is Prefect-free (:func:`tasks.gates.decide`, :func:`tasks.promotion.promote_version`). A
failing gate, or a version that must not become champion (an unfinished, truncated or mismatched checkpoint; a
comparison with a champion evaluated differently), fails the flow run with one message that names the reason
and what to do instead, and leaves the registry unchanged. Promotions of one registered model are serialized
(a lock in the registry), so two flow runs at once end with the better version as champion.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.params import PromoteConfig
from tasks.promotion import promote_task
from tasks.settings import configure_s3, locations

__all__ = ["promote"]


@flow(name="promote", validate_parameters=True)
def promote(config: PromoteConfig) -> dict[str, Any]:
    """Gate ``config.version`` (default: newest) of ``config.registered_model`` and move ``config.alias``."""
    loc = locations(tracking_uri=config.tracking_uri)
    configure_s3()
    result = promote_task(tracking_uri=loc.tracking_uri, name=config.registered_model, version=config.version,
                          gates=list(config.gates), alias=config.alias)
    get_run_logger().info("%s version %s is %s%s", result["name"], result["version"], result["alias"],
                          "" if result["changed"] else " already (nothing changed)")
    return dict(result)
