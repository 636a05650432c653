"""fedsafe's training step: one round of DP-SGD exactly as the site mods granted it.

The train handler that :mod:`fedsafe.client.mods` wrap, in fedsafe's ClientApp and in any
ClientApp built with ``site_mods()``. It takes the round's
:class:`~fedsafe.client.mods.contract.RoundGrant` (the plan: noise, Poisson rate of the site's
public size, steps, clipping), trains the received global model on the site's training split
with DP-SGD (Abadi et al., CCS 2016; Opacus parts, ChaCha20-keyed sampling and noise:
:mod:`fedsafe.training.dp_training`), reports the
:class:`~fedsafe.privacy.events.PoissonGaussianEvent` it spent, and returns the privatized
model in Flower's plain format. Refusals, the ledger, compression and the release check are
the mods' part.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from fedsafe.client.mods.contract import current_grant, report_event, require_event_slot
from fedsafe.client.site import initial_model
from fedsafe.client.site_replies import site_record
from fedsafe.client.update_encoding import received_state
from fedsafe.training.dp_training import resolve_device, train_round


def training_step(msg: Message, context: Context) -> Message:
    """Train one round as granted and reply with the privatized model (plain, uncompressed).

    Parameters
    ----------
    msg
        The coordinator's train message: the global model in ``arrays``.
    context
        The ClientApp's context (unused beyond what the mods bound).

    Returns
    -------
    Message
        ``arrays`` (the model's state dict), ``metrics`` (``num-examples``: the site's public
        size; ``not-private`` when the grant says so) and ``site`` (its name). The mods add the
        spending, ``bytes-up`` and the evaluation.

    Raises
    ------
    ModOrderError
        Before touching any record, when run without fedsafe's site mods around it
        (``ClientApp(mods=fedsafe.client.mods.site_mods())``).
    """
    grant = current_grant()
    require_event_slot()
    cfg, site = grant.call.cfg, grant.call.site
    model: torch.nn.Module = initial_model(site, cfg.seed)
    model.load_state_dict(received_state(msg.content.array_records["arrays"]))
    device = resolve_device(site.device)
    loss = site.task.loss if site.task is not None else None
    event = train_round(
        model, site.data.x_train, site.data.y_train, grant.plan, device, grant.key, loss=loss
    )
    report_event(event)
    model.cpu()
    # The public size, never the exact one: it weights the average (and set the sample rate).
    metrics: dict[str, int | float | list[int] | list[float]] = {"num-examples": site.public_size}
    if grant.not_private:
        metrics["not-private"] = 1
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    content = RecordDict(
        {"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics), "site": site_record(site)}
    )
    return Message(content, reply_to=msg)
