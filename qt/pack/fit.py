"""A packed fit: N `cli.py fit` configurations that differ only in seed and scalar settings,
trained in one process as one Lightning fit.

Each member is first built by `cli.py`'s own parser exactly as its separate fit would be (its
config, its seeded initial model, its data module, callbacks and MLflow logger); the pack takes
their states into one packed module, stacks their data streams, and drives their callbacks
(`qt.pack.callbacks`). So a member's MLflow run, checkpoints and metrics are its fit's.

`fit_pack(members_args)` is the entry point; `python -m qt.pack fit` its command line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L

from qt.callbacks.console import StatusFile
from qt.checkpointing import AtomicCheckpointIO, load_checkpoint
from qt.errors import UserError
from qt.pack.callbacks import Member, PackedCheckpoints, PackedMembers
from qt.pack.data import PackedDataModule
from qt.pack.logger import FanOutLogger
from qt.pack.loop import MEMBER_SETTINGS

# What differs between members without breaking a pack (besides these, the seed).
_MEMBER_KEYS = {f"model.{k}" for k in MEMBER_SETTINGS} | {"seed_everything"}
# Where a member differs from its neighbours by design: its own run and resume point.
_OWN_KEYS = ("trainer.logger", "ckpt_path")


def default_module_class():
    """The packed module a pack uses: the batched one (the loop is the tests' reference)."""
    from qt.pack.module import PackedQTModule

    return PackedQTModule


def _member_cli(args: list[str]):
    """`cli.py fit ARGS` parsed and instantiated (seeded model, data, callbacks, logger), not run."""
    from qt import cli

    class MemberCLI(cli.QTCLI):
        def _run_subcommand(self, subcommand) -> None:
            pass

    return MemberCLI(
        cli.QTModule,
        cli.QTDataModule,
        seed_everything_default=123,
        parser_kwargs={sub: {"default_config_files": [str(cli.BASE_CONFIG)]}
                       for sub in cli.SUBCOMMANDS},
        save_config_callback=cli.MLflowConfig,
        save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
        args=["fit", *args],
        run=True,
    )  # fmt: skip


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def check_compatible(configs: list[dict]) -> None:
    """Members may differ only in their seed and MEMBER_SETTINGS: one sentence naming the key."""

    def shared(config: dict) -> dict:
        return {k: v for k, v in _flat(config).items()
                if k not in _MEMBER_KEYS and not k.startswith(_OWN_KEYS)}  # fmt: skip

    first = shared(configs[0])
    for i, config in enumerate(configs[1:], start=1):
        other = shared(config)
        for key in sorted(set(first) | set(other)):
            if first.get(key) != other.get(key):
                raise UserError(
                    f"pack member {i} sets {key}={other.get(key)!r} where member 0 has "
                    f"{first.get(key)!r}: members of a pack may differ only in their seed and "
                    f"{', '.join(MEMBER_SETTINGS)} (run them as separate fits)."
                )


def pack_id(identities: list[str]) -> str:
    return hashlib.sha256(json.dumps(identities).encode()).hexdigest()[:16]


@dataclass
class PackFit:
    """A finished (or stopped) pack: its trainer, module and members."""

    trainer: L.Trainer
    module: L.LightningModule
    members: list[Member]
    pack_dir: Path

    @property
    def run_ids(self) -> list[str]:
        return [m.logger.run_id for m in self.members]


def fit_pack(
    members_args: list[list[str]],
    *,
    pack_dir: str | Path | None = None,
    ckpt_path: str | None = None,
    module_class=None,
    module_options: dict | None = None,
    callbacks: list | None = None,
    run: bool = True,
) -> PackFit:
    """Train `cli.py fit` configurations (one argument list each) as one pack.

    pack_dir: where the pack's own last.ckpt and pack.json go (default
        `<save_dir>/packs/<id>`, the id a hash of the members' run identities and names).
    ckpt_path: "last" resumes the pack from its last.ckpt, each member in its own MLflow run.
    module_class: the packed module (default `default_module_class()`).
    module_options: its own options (the batched module's `compile`, `autocast`).
    callbacks: more Lightning callbacks for the pack's trainer.
    """
    from qt.console import quiet
    from qt.runtime import keep_freed_memory
    from qt.tracking import IDENTITY_TAG

    keep_freed_memory()
    quiet()
    if not members_args:
        raise UserError("a pack needs at least one member.")
    if ckpt_path not in (None, "last"):
        raise UserError(f"--ckpt_path {ckpt_path}: a pack resumes from 'last' only.")
    clis = [_member_cli(args) for args in members_args]
    configs = [c.config.fit.as_dict() for c in clis]
    check_compatible(configs)
    for config in configs:
        if config.get("ckpt_path"):
            raise UserError("a pack member cannot resume on its own (ckpt_path): resume the "
                            "pack with --ckpt_path last, or fit the member separately.")  # fmt: skip
        if config["trainer"].get("devices") not in (1, "1", "auto") or config["trainer"].get(
            "num_nodes"
        ) not in (1, None):
            raise UserError("a pack runs in one process on one device: set trainer.devices 1.")

    loggers = [c.trainer.logger for c in clis]
    identities = [f"{lg._run_name}|{lg.tags.get(IDENTITY_TAG)}" for lg in loggers]
    save_dir = Path(loggers[0].save_dir or "runs")
    pack_dir = Path(pack_dir) if pack_dir else save_dir / "packs" / pack_id(identities)
    pack_last = pack_dir / "last.ckpt"
    resume = None
    if ckpt_path == "last":
        if not pack_last.is_file():
            raise UserError(
                f"--ckpt_path last: no {pack_last}: expected the last.ckpt of an earlier run of "
                "this pack (the same members, in the same order)."
            )
        saved = load_checkpoint(pack_last)["callbacks"]
        [state] = [v for k, v in saved.items() if k.startswith("PackedMembers")]
        for lg, member in zip(loggers, state["members"]):
            lg._run_id = member["run_id"]  # the resumed pack logs into the same runs
        resume = str(pack_last)

    # ---- the packed module, holding each member's seeded initial model
    models = [c.model for c in clis]
    shared = {k: v for k, v in dict(models[0].hparams).items()
              if k not in MEMBER_SETTINGS and not k.startswith("_")}  # fmt: skip
    seeds = [int(config["seed_everything"]) for config in configs]
    members = [
        {"seed": s, **{k: m.hparams[k] for k in MEMBER_SETTINGS}} for s, m in zip(seeds, models)
    ]
    module_class = module_class or default_module_class()
    module = module_class(members, **(module_options or {}), **shared)
    for i, model in enumerate(models):
        model.rng_seed.fill_(seeds[i] % 2**62)
        module.load_member(i, model, None)

    datamodule = PackedDataModule([c.datamodule for c in clis], seeds)
    pack = [
        Member(index=i, seed=seeds[i], logger=c.trainer.logger, datamodule=c.datamodule,
               callbacks=list(c.trainer.callbacks), hparams=dict(c.model.hparams_initial))
        for i, c in enumerate(clis)
    ]  # fmt: skip
    from qt.callbacks.targets import TargetNetworks
    from qt.pack.module import PackedTargetNetworks

    targets = next(cb for cb in clis[0].trainer.callbacks if isinstance(cb, TargetNetworks))
    settings = {k: getattr(targets, k) for k in ("ema_decay", "step_start_ema",
                                                 "update_ema_every", "tau")}  # fmt: skip
    skip = ("logger", "callbacks", "plugins", "enable_checkpointing")
    trainer_args = {k: v for k, v in configs[0]["trainer"].items() if k not in skip}
    trainer_args.update(devices=1, num_nodes=1, strategy="auto")
    trainer = L.Trainer(
        **trainer_args,
        logger=FanOutLogger(loggers),
        # StatusFile: the pack's iteration, step and rate for a study's progress lines
        callbacks=[PackedTargetNetworks(**settings), PackedMembers(pack),
                   PackedCheckpoints(pack, pack_last), StatusFile(), *(callbacks or [])],
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=True,  # PackedCheckpoints is the pack's Checkpoint
    )  # fmt: skip
    pack_dir.mkdir(parents=True, exist_ok=True)
    fit = PackFit(trainer, module, pack, pack_dir)
    if run:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
        info = {"members": [{"run_id": m.logger.run_id, "seed": m.seed, "identity": ident,
                             "stopped": m.stopped} for m, ident in zip(pack, identities)]}  # fmt: skip
        (pack_dir / "pack.json").write_text(json.dumps(info, indent=1))
    return fit


__all__ = ["PackFit", "check_compatible", "default_module_class", "fit_pack", "pack_id"]
