"""PackedQTModule: N fits of one architecture trained as one batched computation.

Every parameter, target copy and Adam moment is stored stacked, (N, *shape), under the names of
`QTModule`'s networks; one training step runs QTModule's step (critic update, then actor update)
for all members at once through `qt.pack.functional`, as one function that `torch.compile` can
take whole (forward, backward, clipping and Adam of both halves). What belongs to a member stays
its own: its batch (the batch's leading dim), its dropout masks (from its seed and step),
its coin flip and max_q_backup noise (QTModule's own streams), its gradient-norm clipping, its
Adam state and learning-rate schedule, its targets, its eta2. See CONTRACT.md beside this file
for what the Lightning plumbing may use.

The maths follows `QTModule.training_step` operation by operation; the tests check a member
against a separate fit to float tolerance (dropout 0, where the two draw different masks).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import lightning as L
import torch

from qt import losses
from qt.callbacks.targets import ema_due
from qt.data.batch import Segments
from qt.errors import UserError
from qt.module import QTModule
from qt.pack import functional as PF
from qt.runtime import autocast_dtype, compile_by_default, compile_mode
from qt.seeding import derived_seed

# Scalar settings a member may set for itself; everything else is shared by the pack.
OVERRIDABLE = ("eta", "eta2", "lambda_", "learning_rate", "critic_lr", "weight_decay",
               "grad_norm", "lr_min", "rtg_no_q", "infer_no_q")  # fmt: skip
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults, as QTModule uses them
# derived_seed(seed, step, 1000 + phase, word): apart from QTModule's streams 0, 1 and 2 + rank
_DROPOUT_STREAM = 1000
_M32 = 0xFFFFFFFF
METRICS = ("train/critic_loss", "train/bc_loss", "train/q_loss", "train/actor_loss",
           "train/target_q_mean", "train/actor_grad_norm", "train/critic_grad_norm")  # fmt: skip


# QTModule options a pack does not implement (the Decision Transformer's recipe), at the
# values it does
_QT_RECIPE = {"train_critic": True, "optimizer": "adam", "warmup_steps": 0}


@dataclass(frozen=True)
class _Config:
    """The static facts of a pack's step (constants of the compiled function)."""

    n_layer: int
    n_head: int
    sar: bool
    scale: float
    dropout: float
    embed_dropout: float
    ema_dropout: bool
    discount: float
    k_rewards: bool
    use_discount: bool
    repeats: int
    next_state: bool
    idle: tuple[str, ...]  # actor parameters that get no gradient (torch's Adam skips them)
    amp: torch.dtype | None
    device_type: str


def _buffer_name(group: str, name: str) -> str:
    return f"{group}__{name.replace('.', '__')}"


class PackedQTModule(L.LightningModule):
    """N QT fits that share their architecture, trained together.

    Args:
        members: one dict per member: {"seed": int} plus overrides of the scalar settings in
            `OVERRIDABLE`. Member i starts from the parameters QTModule draws right after
            `torch.manual_seed(seed)`, as a separate fit seeded with `seed` does.
        compile: run the step through `torch.compile` (off: the same function eagerly); None
            (the default): on CUDA only (`qt.runtime.compile_by_default`).
        autocast: bf16 autocast where it pays (`qt.runtime.autocast_dtype`: CUDA, or a CPU
            with AMX); off: float32 everywhere.
        dropout_noise: where dropout masks come from, "drawn" or "hashed"
            (`qt.pack.functional.member_dropout`); None (the default): drawn on the CPU, hashed
            elsewhere.
        **hparams: QTModule's arguments, shared by every member.
    """

    def __init__(
        self,
        members: list[dict],
        compile: bool | None = None,
        autocast: bool = True,
        dropout_noise: str | None = None,
        **hparams,
    ) -> None:
        super().__init__()
        if not members:
            raise UserError("PackedQTModule got no members: expected at least one.")
        for i, m in enumerate(members):
            extra = sorted(set(m) - {"seed", *OVERRIDABLE})
            if "seed" not in m or not isinstance(m["seed"], int) or extra:
                raise UserError(
                    f"members[{i}]={m!r}: expected a whole-number 'seed' and overrides of "
                    f"only {', '.join(OVERRIDABLE)}"
                    + (f" (got {', '.join(extra)})." if extra else ".")
                )
        bad = sorted(set(hparams) - set(QTModule.__init__.__code__.co_varnames[1:]))
        if bad:
            raise UserError(f"PackedQTModule got unknown settings {', '.join(bad)}.")
        unpackable = {
            k: hparams[k] for k, ok in _QT_RECIPE.items() if k in hparams and hparams[k] != ok
        }
        if unpackable:
            raise UserError(
                f"PackedQTModule got {unpackable}: a pack trains QT's recipe "
                f"({', '.join(f'{k}={v!r}' for k, v in _QT_RECIPE.items())}); fit these alone."
            )
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.members = [dict(m) for m in members]
        self.shared = dict(hparams)
        self.use_compile = compile
        if dropout_noise not in (None, "drawn", "hashed"):
            raise UserError(
                f"PackedQTModule got dropout_noise={dropout_noise!r}: expected 'drawn', "
                "'hashed' or None."
            )
        self._dropout_noise = dropout_noise

        fresh = [self._fresh_member(i, seeded=True) for i in range(len(members))]
        hp = fresh[0].hparams
        self.actor_names = [n for n, _ in fresh[0].actor.named_parameters()]
        self.critic_names = [n for n, _ in fresh[0].critic.named_parameters()]
        for group, names, net in (
            ("actor", self.actor_names, "actor"),
            ("critic", self.critic_names, "critic"),
            ("ema_actor", self.actor_names, "ema_actor"),
            ("critic_target", self.critic_names, "critic_target"),
        ):
            for name in names:
                stacked = torch.stack(
                    [dict(getattr(f, net).named_parameters())[name].detach() for f in fresh]
                )
                self.register_buffer(_buffer_name(group, name), stacked.clone())
        for group, names in (("actor", self.actor_names), ("critic", self.critic_names)):
            for name in names:
                ref = getattr(self, _buffer_name(group, name))
                self.register_buffer(_buffer_name(group + "_exp_avg", name), torch.zeros_like(ref))
                self.register_buffer(
                    _buffer_name(group + "_exp_avg_sq", name), torch.zeros_like(ref)
                )
        self.register_buffer("state_mean", fresh[0].state_mean.clone())
        self.register_buffer("state_std", fresh[0].state_std.clone())

        def per_member(key: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([float(f.hparams[key]) for f in fresh], dtype=dtype)

        n = len(members)
        self.register_buffer("eta", per_member("eta", torch.float32))
        self.register_buffer("eta2", per_member("eta2", torch.float64))
        self.register_buffer("lambda_", per_member("lambda_", torch.float64))
        self.register_buffer("weight_decay", per_member("weight_decay", torch.float64))
        self.register_buffer("grad_norm", per_member("grad_norm", torch.float64))
        self.register_buffer("train_steps", torch.zeros(n, dtype=torch.int64))
        self.register_buffer("rng_seed", torch.tensor([m["seed"] for m in members]))
        self.register_buffer("active", torch.ones(n, dtype=torch.bool))
        # Adam's step counts (actor, critic) and learning rates with their schedule position
        self.register_buffer("adam_steps", torch.zeros(n, 2, dtype=torch.int64))
        lrs = [[f.hparams.learning_rate, f.hparams.critic_lr] for f in fresh]
        self.register_buffer("lr", torch.tensor(lrs, dtype=torch.float64))
        self.register_buffer("sched_epoch", torch.zeros(n, dtype=torch.int64))

        self._cfg = _Config(
            n_layer=hp.n_layer, n_head=hp.n_head, sar=hp.sar, scale=float(hp.scale),
            dropout=float(hp.dropout), embed_dropout=float(hp.embed_dropout),
            ema_dropout=bool(hp.ema_dropout), discount=float(hp.discount),
            k_rewards=bool(hp.k_rewards), use_discount=bool(hp.use_discount),
            repeats=10 if hp.max_q_backup else 1, next_state=bool(hp.next_state_loss),
            idle=() if hp.next_state_loss else ("predict_state.weight", "predict_state.bias"),
            amp=None, device_type="cpu",
        )  # fmt: skip
        self._autocast = autocast
        self._step_fns: dict = {}
        self._metrics: torch.Tensor | None = None
        self._nonfinite = [0.0] * n
        self._sync_host()

    # ------------------------------------------------------------------ members
    @property
    def n_members(self) -> int:
        return len(self.members)

    @property
    def seeds(self) -> list[int]:
        return [int(s) for s in self.rng_seed.tolist()]

    def member_hparams(self, i: int) -> dict:
        """QTModule's arguments of member i: the shared ones and its overrides."""
        over = {k: v for k, v in self.members[i].items() if k != "seed"}
        return self.shared | over

    def _fresh_member(self, i: int, seeded: bool) -> QTModule:
        """Member i's QTModule: as a fit seeded with its seed draws it when `seeded`; the
        global generator is left as it was."""
        with torch.random.fork_rng(devices=[]):
            if seeded:
                torch.manual_seed(self.members[i]["seed"])
            return QTModule(**self.member_hparams(i))

    def _group(self, group: str) -> dict[str, torch.Tensor]:
        names = self.actor_names if group.startswith(("actor", "ema")) else self.critic_names
        return {name: getattr(self, _buffer_name(group, name)) for name in names}

    def member_module(self, i: int) -> QTModule:
        """A fresh QTModule holding member i's current networks, eta2 and step counts."""
        module = self._fresh_member(i, seeded=False)
        with torch.no_grad():
            for net, group in (("actor", "actor"), ("critic", "critic"),
                               ("ema_actor", "ema_actor"), ("critic_target", "critic_target")):  # fmt: skip
                stacked = self._group(group)
                for name, param in getattr(module, net).named_parameters():
                    param.copy_(stacked[name][i])
            module.eta2.fill_(float(self.eta2[i]))
            module.train_steps.fill_(int(self.train_steps[i]))
            module.rng_seed.fill_(int(self.rng_seed[i]))
            module.state_mean.copy_(self.state_mean)
            module.state_std.copy_(self.state_std)
        module._steps, module._seed = int(self.train_steps[i]), int(self.rng_seed[i])
        return module.to(self.device)

    def member_eta2(self, i: int) -> float:
        return float(self.eta2[i])

    def member_optimizer_states(self, i: int) -> list[dict]:
        """[actor, critic] Adam state dicts of member i, as a separate fit's checkpoint holds."""
        out = []
        for j, (group, wd) in enumerate((("actor", float(self.weight_decay[i])), ("critic", 0.0))):
            params = [torch.zeros_like(t[i]).requires_grad_() for t in self._group(group).values()]
            opt = torch.optim.Adam(params, lr=float(self.lr[i, j]), weight_decay=wd)
            if self.shared.get("lr_decay", False):
                opt.param_groups[0]["initial_lr"] = self._schedulers[i][j].base_lrs[0]
            steps = int(self.adam_steps[i, j])
            if steps > 0:
                m, v = self._group(group + "_exp_avg"), self._group(group + "_exp_avg_sq")
                for p, name in zip(params, m):
                    if group == "actor" and name in self._cfg.idle:
                        continue  # no gradient, no state (as torch's Adam)
                    opt.state[p] = {
                        "step": torch.tensor(float(steps)),
                        "exp_avg": m[name][i].detach().clone(),
                        "exp_avg_sq": v[name][i].detach().clone(),
                    }
            out.append(opt.state_dict())
        return out

    def member_scheduler_states(self, i: int) -> list[dict]:
        """[actor, critic] CosineAnnealingLR state dicts of member i when lr_decay, else []."""
        if not self.shared.get("lr_decay", False):
            return []
        return [s.state_dict() for s in self._schedulers[i]]

    @torch.no_grad()
    def load_member(
        self,
        i: int,
        module: QTModule,
        optimizer_states: list[dict] | None,
        scheduler_states: list[dict] | None = None,
    ) -> None:
        """Put a separate fit's state (networks, eta2, steps, seed, Adam, schedule) in slot i."""
        for net in ("actor", "critic", "ema_actor", "critic_target"):
            stacked = self._group(net)
            for name, param in getattr(module, net).named_parameters():
                if name not in stacked or stacked[name].shape[1:] != param.shape:
                    raise UserError(
                        f"load_member({i}): the module's {net}.{name} does not fit the pack's "
                        "architecture: expected the same sizes as the other members."
                    )
                stacked[name][i].copy_(param.detach())
        hp = module.hparams
        self.members[i].update({k: hp[k] for k in OVERRIDABLE if k in hp})
        self.eta[i] = float(hp.eta)
        self.lambda_[i] = float(hp.lambda_)
        self.weight_decay[i] = float(hp.weight_decay)
        self.grad_norm[i] = float(hp.grad_norm)
        self.eta2[i] = float(module.eta2)
        self.train_steps[i] = int(module.train_steps)
        if int(module.rng_seed) >= 0:
            self.rng_seed[i] = int(module.rng_seed)
            self.members[i]["seed"] = int(module.rng_seed)
        self.lr[i] = torch.tensor([hp.learning_rate, hp.critic_lr], dtype=torch.float64)
        for j, group in enumerate(("actor", "critic")):
            m, v = self._group(group + "_exp_avg"), self._group(group + "_exp_avg_sq")
            self.adam_steps[i, j] = 0
            for t in (*m.values(), *v.values()):
                t[i].zero_()
            if optimizer_states is None:
                continue
            state = optimizer_states[j]
            self.lr[i, j] = float(state["param_groups"][0]["lr"])
            for k, name in enumerate(m):
                if k in state["state"]:
                    s = state["state"][k]
                    m[name][i].copy_(s["exp_avg"])
                    v[name][i].copy_(s["exp_avg_sq"])
                    self.adam_steps[i, j] = int(s["step"])
        if scheduler_states:
            self.sched_epoch[i] = int(scheduler_states[0]["last_epoch"])
        self.active[i] = True
        self._sync_host()
        if scheduler_states:
            for sched, state in zip(self._schedulers[i], scheduler_states):
                sched.load_state_dict(state)

    def set_member_active(self, i: int, flag: bool) -> None:
        self.active[i] = bool(flag)
        self._active[i] = bool(flag)

    @property
    def last_metrics(self) -> list[dict[str, torch.Tensor]]:
        """Member i's train/* and lr/* metrics of the latest step (QTModule's names)."""
        if self._metrics is None:
            return [{} for _ in range(self.n_members)]
        rows = self._metrics.detach().unbind(0)
        out = []
        for i, row in enumerate(rows):
            d = dict(zip(METRICS, row.unbind(0)))
            d["lr/actor"] = torch.tensor(self._lrs[i][0])
            d["lr/critic"] = torch.tensor(self._lrs[i][1])
            d["train/nonfinite"] = torch.tensor(self._nonfinite[i])
            out.append(d)
        return out

    # ------------------------------------------------------------------ host state
    def _sync_host(self) -> None:
        """Host copies of the per-member counters, and the schedulers, from the buffers."""
        self._steps = [int(x) for x in self.train_steps.tolist()]
        self._adam = [[int(a), int(c)] for a, c in self.adam_steps.tolist()]
        self._lrs = [[float(a), float(c)] for a, c in self.lr.tolist()]
        self._active = [bool(x) for x in self.active.tolist()]
        self._seeds = [int(x) for x in self.rng_seed.tolist()]
        self._wd = [float(x) for x in self.weight_decay.tolist()]
        self._schedulers = []
        lr_decay = self.shared.get("lr_decay", False)
        for i in range(self.n_members):
            hp = self.member_hparams(i)
            pair = []
            for j, base in enumerate((hp.get("learning_rate", 3e-4), hp.get("critic_lr", 3e-4))):
                opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
                sched = None
                if lr_decay:
                    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
                        opt, T_max=hp.get("max_iters", 500), eta_min=hp.get("lr_min", 0.0)
                    )
                    epoch = int(self.sched_epoch[i])
                    if epoch > 0:  # resume the recursion where it was
                        sched.last_epoch, sched._step_count = epoch, epoch + 1
                        sched._last_lr = [self._lrs[i][j]]
                opt.param_groups[0]["lr"] = self._lrs[i][j]
                pair.append(sched if sched is not None else opt)
            self._schedulers.append(pair)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._sync_host()
        return result

    # ------------------------------------------------------------------ training
    def configure_optimizers(self):
        """None: the pack's Adam is its own (per-member learning rates, one fused update)."""
        return None

    def _step_fn(self):
        device_type = self.device.type
        amp = autocast_dtype(device_type) if self._autocast else None
        use_compile = (
            compile_by_default(device_type) if self.use_compile is None else self.use_compile
        )
        key = (device_type, amp, use_compile)
        if key not in self._step_fns:
            cfg = _Config(**{**self._cfg.__dict__, "amp": amp, "device_type": device_type})
            self._step_fns[key] = PackedStep(cfg, use_compile)
        return self._step_fns[key]

    def dropout_noise(self) -> str:
        """Where this pack's dropout masks come from (`qt.pack.functional.member_dropout`):
        'drawn' (each member's own torch generator) on the CPU, 'hashed' (a counter-based hash,
        free inside compiled kernels) elsewhere, unless the module was given one. A member's
        masks are a function of its seed, its step and this choice; packs resume on the device
        type they started on."""
        if self._dropout_noise is not None:
            return self._dropout_noise
        return "drawn" if self.device.type == "cpu" else "hashed"

    def _host_inputs(self, batch: Segments) -> dict:
        """This step's per-member numbers: coin flips, max_q_backup noise, dropout noise per
        phase (0 the EMA actor's, 1 the actor's), Adam's step sizes and bias corrections
        (float64 on the host, as torch.optim.Adam has them)."""
        n, dev = self.n_members, self.device
        coins, noise, adam = [], [], []
        for i in range(n):
            step, seed = self._steps[i], self._seeds[i]
            coin = torch.Generator().manual_seed(derived_seed(seed, step, 0))
            coins.append(bool(losses.coin_flip(coin)))
            if self._cfg.repeats > 1:
                g = torch.Generator().manual_seed(derived_seed(seed, step, 1))
                noise.append(torch.randn(self._cfg.repeats - 1, generator=g))
            row = []
            for j in (0, 1):
                t = self._adam[i][j] + 1
                row += [-(self._lrs[i][j] / (1 - BETA1**t)), (1 - BETA2**t) ** 0.5]
            row.append(self._wd[i])
            adam.append(row)
        out = {
            "coin": torch.tensor(coins, device=dev),
            "adam": torch.tensor(adam, dtype=torch.float32, device=dev),
            "max_norm": torch.where(
                self.grad_norm > 0, self.grad_norm, torch.full_like(self.grad_norm, math.inf)
            ).float(),
        }
        if noise:
            out["noise"] = torch.stack(noise).to(dev)
        cfg = self._cfg
        for phase in (0, 1):
            if phase == 0 and not cfg.ema_dropout:
                out["dropout0"] = None
            elif self.dropout_noise() == "hashed":
                keys = [
                    [derived_seed(seed, step, _DROPOUT_STREAM + phase, word) & _M32
                     for word in (0, 1)]
                    for seed, step in zip(self._seeds, self._steps)
                ]  # fmt: skip
                out[f"dropout{phase}"] = torch.tensor(keys, dtype=torch.int64, device=dev)
            else:
                B, T = batch.mask.shape[1:]
                sites = PF.dropout_sites(
                    B * (cfg.repeats if phase == 0 else 1), T,
                    getattr(self, _buffer_name("actor", "embed_state.weight")).shape[1],
                    n_layer=cfg.n_layer, n_head=cfg.n_head, dropout=cfg.dropout,
                    embed_dropout=cfg.embed_dropout,
                )  # fmt: skip
                seeds = [
                    derived_seed(seed, step, _DROPOUT_STREAM + phase)
                    for seed, step in zip(self._seeds, self._steps)
                ]
                out[f"dropout{phase}"] = PF.drawn_uniforms(seeds, sites, dev)
        return out

    def training_step(self, batch: Segments, batch_idx: int) -> None:
        if batch.states.shape[0] != self.n_members:
            raise UserError(
                f"PackedQTModule got a batch for {batch.states.shape[0]} members: expected "
                f"{self.n_members} (a leading member dim on every field)."
            )
        state = {g: self._group(g) for g in (
            "actor", "critic", "ema_actor", "critic_target", "actor_exp_avg",
            "actor_exp_avg_sq", "critic_exp_avg", "critic_exp_avg_sq")}  # fmt: skip
        inputs = self._host_inputs(batch)
        metrics, ok = self._step_fn()(
            state, Segments(*batch), inputs, self.eta2.float(), self.eta, self.active
        )
        ok_c, ok_a = ok.tolist()
        for i in range(self.n_members):
            if not self._active[i]:
                self._nonfinite[i] = 0.0
                continue
            self._adam[i][1] += int(ok_c[i])
            self._adam[i][0] += int(ok_a[i])
            self._steps[i] += int(ok_a[i])
            self._nonfinite[i] = 0.0 if ok_a[i] else 1.0
            if not ok_a[i]:
                self._active[i] = False
        self.train_steps.copy_(torch.tensor(self._steps))
        self.adam_steps.copy_(torch.tensor(self._adam))
        self.active.copy_(torch.tensor(self._active))
        self._metrics = metrics

    @torch.no_grad()
    def update_targets(
        self,
        *,
        ema_decay: float = 0.995,
        step_start_ema: int = 1000,
        update_ema_every: int = 5,
        tau: float = 0.005,
    ) -> None:
        """EMA actor and Polyak critic of every active member, on TargetNetworks' schedule:
        n = the member's steps completed before its latest step."""
        ema_on, polyak_on = [], []
        for i in range(self.n_members):
            n = self._steps[i] - 1
            live = self._active[i] and n >= 0
            ema_on.append(live and ema_due(n, step_start_ema, update_ema_every))
            polyak_on.append(live)
        for tgt, src, on, weight in (
            ("ema_actor", "actor", ema_on, 1.0 - ema_decay),
            ("critic_target", "critic", polyak_on, tau),
        ):
            if not any(on):
                continue
            targets, sources = list(self._group(tgt).values()), list(self._group(src).values())
            if all(on):
                torch._foreach_lerp_(targets, sources, weight)
                continue
            w = torch.tensor([weight if x else 0.0 for x in on], device=self.device)
            for t, s in zip(targets, sources):
                t.lerp_(s, w.view(-1, *[1] * (t.dim() - 1)))

    def on_train_epoch_end(self) -> None:
        """Per-member cosine step and eta2 /= lambda_, for active members only."""
        lr_decay = self.shared.get("lr_decay", False)
        for i in range(self.n_members):
            if not self._active[i]:
                continue
            if lr_decay:
                for j, sched in enumerate(self._schedulers[i]):
                    sched.step()
                    self._lrs[i][j] = sched.optimizer.param_groups[0]["lr"]
                self.sched_epoch[i] += 1
        active = self.active
        self.eta2.copy_(torch.where(active, self.eta2 / self.lambda_, self.eta2))
        self.lr.copy_(torch.tensor(self._lrs, dtype=torch.float64))

    def test_step(self, batch, batch_idx) -> None:
        """Testing is acting; a member is tested through `member_module`."""

    def validation_step(self, batch, batch_idx) -> None:
        """Validation is acting; the plumbing evaluates each member's `member_module`."""


class PackedTargetNetworks(L.Callback):
    """`TargetNetworks` for a pack: calls `update_targets` after every training batch."""

    def __init__(self, ema_decay=0.995, step_start_ema=1000, update_ema_every=5, tau=0.005):
        self.kwargs = dict(ema_decay=ema_decay, step_start_ema=step_start_ema,
                           update_ema_every=update_ema_every, tau=tau)  # fmt: skip

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.update_targets(**self.kwargs)


# ---------------------------------------------------------------------------- the step
def _view(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x (N,) shaped to broadcast over `like` (N, ...)."""
    return x.view(-1, *[1] * (like.dim() - 1))


def _per_member_mean(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


def _clip_and_adam(
    params: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    exp_avg: dict[str, torch.Tensor],
    exp_avg_sq: dict[str, torch.Tensor],
    loss: torch.Tensor,
    ok: torch.Tensor,
    max_norm: torch.Tensor,
    neg_step_size: torch.Tensor,
    bc2_sqrt: torch.Tensor,
    weight_decay: torch.Tensor | None,
    idle: tuple[str, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """clip_grad_norm_ (foreach) then torch.optim.Adam's update, per member, in place.

    A member updates only where `ok` and its loss and total grad norm are finite; returns its
    pre-clip grad norm and that final ok. Parameters in `idle` get no gradient from the loss
    (None in torch): they take no part in the norm and are not updated.
    """
    names = [k for k in params if k not in idle]
    norms = torch.stack(
        [torch.linalg.vector_norm(grads[k].reshape(grads[k].shape[0], -1), dim=1) for k in names]
    )
    total = torch.linalg.vector_norm(norms, dim=0)  # (N,)
    ok = ok & torch.isfinite(loss) & torch.isfinite(total)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for k in names:
        p, g, m, v = params[k], grads[k], exp_avg[k], exp_avg_sq[k]
        g = g * _view(coef, g)
        if weight_decay is not None:
            g = g + _view(weight_decay, p) * p
        m_new = m.lerp(g, 1 - BETA1)
        v_new = v.mul(BETA2).addcmul(g, g, value=1 - BETA2)
        denom = v_new.sqrt() / _view(bc2_sqrt, v) + EPS
        p_new = p + _view(neg_step_size, p) * m_new / denom
        keep = _view(ok, p)
        m.copy_(torch.where(keep, m_new, m))
        v.copy_(torch.where(keep, v_new, v))
        p.copy_(torch.where(keep, p_new, p))
    return total, ok


def _targets(st, batch, inp, *, cfg: _Config):
    """Critic targets from the EMA actor and the target critic, and the rewards the actor step
    uses (QTModule._critic_loss's no-grad part), for N members."""
    N, B, K = batch.mask.shape
    with torch.no_grad(), _amp(cfg):
        R = cfg.repeats
        src = batch
        if R > 1:
            src = Segments(*(t.repeat_interleave(R, dim=1) for t in batch))
            noise = torch.cat([inp["noise"].new_zeros(N, 1), inp["noise"]], dim=1)  # (N, R)
            rtg = src.rtg.clone()
            rtg[:, :, K - 1, 0] += 0.1 * noise.repeat(1, B)
            src = src._replace(rtg=rtg)
        next_actions = PF.actor_forward(
            st["ema_actor"], src.states, src.actions, src.rewards, src.rtg[:, :, :-1],
            src.timesteps, src.mask, noise=inp["dropout0"], **_arch(cfg),
        )[1]  # fmt: skip
        if cfg.k_rewards:
            tq1, tq2 = PF.critic_forward(
                st["critic_target"], src.states[:, :, -1], next_actions[:, :, -1]
            )
        else:
            tq1, tq2 = PF.critic_forward(st["critic_target"], src.states, next_actions)
        tq1, tq2 = tq1.float(), tq2.float()
        if R > 1:
            tq1, tq2 = tq1.unflatten(1, (-1, R)).amax(2), tq2.unflatten(1, (-1, R)).amax(2)
        q_next = torch.minimum(tq1, tq2)
        targets = functools.partial(
            losses.critic_targets, discount=cfg.discount, scale=cfg.scale,
            k_rewards=cfg.k_rewards, use_discount=cfg.use_discount,
        )  # fmt: skip
        target_q, rewards = torch.vmap(targets)(batch, q_next)
    return target_q, rewards


def _critic_loss(cp, batch, target_q, *, cfg: _Config):
    """Per-member critic losses (N,)."""
    with _amp(cfg):
        q1, q2 = PF.critic_forward(cp, batch.states, batch.actions)
    return torch.vmap(losses.critic_loss)(q1.float(), q2.float(), target_q, batch.mask)


def _actor_loss(ap, critic, batch, rewards, noise, coin, eta2, eta, *, cfg: _Config):
    """Per-member actor losses (N,), with their BC and Q terms: the critic frozen."""
    N = batch.mask.shape[0]
    with _amp(cfg):
        state_preds, action_preds, reward_preds = PF.actor_forward(
            ap, batch.states, batch.actions, rewards, batch.rtg[:, :, :-1],
            batch.timesteps, batch.mask, noise=noise, **_arch(cfg),
        )  # fmt: skip
        # the Q term's numerator is Q1 or Q2 by the member's coin, its denominator the other,
        # detached: pick each member's networks by the coin, so that only the numerator's
        # network is differentiated (as QTModule's backward reaches only that one)
        c = coin.view(N, 1, 1)
        num_net, den_net = {}, {}
        for name, w in critic.items():
            if name.startswith("q1_model."):
                j = name[len("q1_model.") :]
                w1, w2 = w, critic["q2_model." + j]
                cw = c if w.dim() == 3 else c[:, :, 0]
                num_net["q1_model." + j] = torch.where(cw, w1, w2)
                den_net["q1_model." + j] = torch.where(cw, w2, w1)
        num = PF.q_mlp(num_net, "q1_model", torch.cat([batch.states, action_preds], dim=-1))
        with torch.no_grad():
            den = PF.q_mlp(
                den_net, "q1_model", torch.cat([batch.states, action_preds.detach()], dim=-1)
            )
    state_preds, action_preds = state_preds.float(), action_preds.float()
    bc_loss = functools.partial(losses.bc_loss, scale=cfg.scale, next_state=cfg.next_state)
    if cfg.sar:
        bc = torch.vmap(bc_loss)(
            action_preds, batch.actions, state_preds, batch.states, batch.mask,
            reward_preds.float(), rewards,
        )  # fmt: skip
    else:
        bc = torch.vmap(bc_loss)(action_preds, batch.actions, state_preds, batch.states, batch.mask)
    q = torch.vmap(functools.partial(losses.q_loss, use_q1=True))(
        num.float(), den.float(), batch.mask
    )
    return eta2 * bc + eta * q, bc, q


def _amp(cfg: _Config):
    return torch.autocast(
        cfg.device_type, dtype=cfg.amp or torch.bfloat16, enabled=cfg.amp is not None
    )


def _arch(cfg: _Config) -> dict:
    return dict(n_layer=cfg.n_layer, n_head=cfg.n_head, sar=cfg.sar, scale=cfg.scale,
                dropout=cfg.dropout, embed_dropout=cfg.embed_dropout)  # fmt: skip


class PackedStep:
    """QTModule's training step for N members, updating the state in place.

    Pure pieces: the targets, the critic loss, the actor loss (each compiled on its own when
    `compile`, forward and backward through AOTAutograd), and the clipped Adam update (eager). Gradients come from torch.autograd.grad of the
    summed per-member losses (a member's gradient is its own loss's: no term couples members).
    """

    def __init__(self, cfg: _Config, compile: bool) -> None:
        self.cfg = cfg
        parts = {
            "targets": functools.partial(_targets, cfg=cfg),
            "critic_loss": functools.partial(_critic_loss, cfg=cfg),
            "actor_loss": functools.partial(_actor_loss, cfg=cfg),
            "critic_update": _clip_and_adam,
            "actor_update": functools.partial(_clip_and_adam, idle=cfg.idle),
        }
        if compile:  # the update stays eager: a few hundred small ops (~ms), many kernels
            mode = compile_mode(cfg.device_type)
            for name in ("targets", "critic_loss", "actor_loss"):
                parts[name] = torch.compile(parts[name], dynamic=False, mode=mode)
        self.parts = parts

    def __call__(self, st, batch, inp, eta2, eta, active):
        """Returns the metrics (N, len(METRICS)) and (critic ok, actor ok) (2, N): whether each
        member's half-steps were finite (and active), and so applied."""
        P = self.parts
        adam = inp["adam"]  # (N, 5): actor (-step, bc2), critic (-step, bc2), weight decay
        target_q, rewards = P["targets"](st, batch, inp)

        cp = {k: v.detach().requires_grad_() for k, v in st["critic"].items()}
        c_loss = P["critic_loss"](cp, batch, target_q)
        c_grads = dict(zip(cp, torch.autograd.grad(c_loss.sum(), list(cp.values()))))
        c_norm, ok_c = P["critic_update"](
            st["critic"], c_grads, st["critic_exp_avg"], st["critic_exp_avg_sq"],
            c_loss.detach(), active, inp["max_norm"], adam[:, 2], adam[:, 3], None,
        )  # fmt: skip

        ap = {k: v.detach().requires_grad_() for k, v in st["actor"].items()}
        critic = {k: v.detach() for k, v in st["critic"].items()}
        a_loss, bc, q = P["actor_loss"](
            ap, critic, batch, rewards, inp["dropout1"], inp["coin"], eta2, eta
        )
        wanted = [k for k in ap if k not in self.cfg.idle]
        grads = torch.autograd.grad(a_loss.sum(), [ap[k] for k in wanted])
        a_grads = dict(zip(wanted, grads))  # the idle ones are skipped by the update
        a_norm, ok_a = P["actor_update"](
            st["actor"], a_grads, st["actor_exp_avg"], st["actor_exp_avg_sq"],
            a_loss.detach(), ok_c, inp["max_norm"], adam[:, 0], adam[:, 1], adam[:, 4],
        )  # fmt: skip
        metrics = torch.stack(
            [c_loss, bc, q, a_loss, _per_member_mean(target_q), a_norm, c_norm], dim=1
        ).detach()
        return metrics, torch.stack([ok_c, ok_a])
