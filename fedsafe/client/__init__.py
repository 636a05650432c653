"""fedsafe.client: a site's ClientApp, its mods and its training step.

For a ClientApp of your own: ``fedsafe.client.mods.site_mods()`` and
``fedsafe.client.training_step`` (imported on first use, so that light modules of this
package, such as the policy, do not load torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedsafe.client.train_step import training_step

__all__ = ["training_step"]


def __getattr__(name: str) -> Any:
    if name == "training_step":
        from fedsafe.client.train_step import training_step

        return training_step
    raise AttributeError(f"module 'fedsafe.client' has no attribute {name!r}")
