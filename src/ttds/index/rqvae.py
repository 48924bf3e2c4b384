"""`RQVAE`: residual-quantised autoencoder that turns a text embedding into M codes (a semantic ID).

    x [n, d] --encoder MLP--> z [n, D] --M residual levels--> codes [n, M], z_q = sum_l c_l --decoder--> x_hat

Level l picks the code nearest to the residual r_l (r_0 = z, r_{l+1} = r_l - c_l), by L2 or by
cosine. Loss = MSE(x_hat, x) + sum_l (||sg(r_l) - c_l||^2 + beta ||r_l - sg(c_l)||^2), with the
straight-through estimator z + sg(z_q - z) into the decoder. Codebooks start from k-means on the
residuals of a sample, and codes left unused for an epoch are re-seeded from current residuals.

The dynamic TTDS model needs the internals: `codebooks[l]` ([K, D] parameters), and `quantize(z)`
returns the per-level residuals and chosen code vectors (`Quantized`), so a per-level residual
loss can be built on them.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ttds.errors import TTDSError

log = logging.getLogger(__name__)


@dataclass
class RQVAEConfig:
    levels: int = 4
    codebook_size: int = 256
    code_dim: int = 256
    hidden: list[int] | None = None  # encoder hidden layers; None: [min(2048,2d), min(1024,d), min(512,d/2)] (paper for d=4096)
    distance: str = "l2"  # l2 | cosine
    beta: float = 0.25  # commitment weight
    dropout: float = 0.0
    standardize: bool = True  # centre and scale the input embeddings (statistics kept as buffers)
    kmeans_init: bool = True
    kmeans_iters: int = 25
    kmeans_sample: int = 8192  # items used for the k-means initialisation
    dead_code_reseed: bool = True  # re-seed codes unused during an epoch
    epochs: int = 300
    max_steps: int = 3000  # optimizer-step budget, in whole epochs (0 = none): the same fit on any machine
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    max_minutes: float = 0.0  # optional wall-clock cap (0 = none); a fit it stops depends on the machine's speed
    seed: int = 0

    def __post_init__(self):
        if self.distance not in ("l2", "cosine"):
            raise TTDSError(f"config index.rqvae.distance={self.distance!r}: expected l2 or cosine")
        if self.levels < 1 or self.codebook_size < 2:
            raise TTDSError("config index.rqvae: levels must be >= 1 and codebook_size >= 2")

    def hidden_layers(self, d: int) -> list[int]:
        if self.hidden is not None:
            return [int(h) for h in self.hidden]
        return [max(self.code_dim, min(2048, 2 * d)), max(self.code_dim, min(1024, d)), max(self.code_dim, min(512, d // 2))]


def mlp(sizes: list[int], dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [nn.ReLU(), nn.Dropout(dropout)] if dropout else [nn.ReLU()]
    return nn.Sequential(*layers)


def pairwise_distance(x: torch.Tensor, codebook: torch.Tensor, distance: str = "l2") -> torch.Tensor:
    """[n, D] x [K, D] -> [n, K]: squared L2, or 1 - cosine similarity."""
    if distance == "cosine":
        return 1 - F.normalize(x, dim=-1) @ F.normalize(codebook, dim=-1).T
    return (x.pow(2).sum(-1, keepdim=True) - 2 * x @ codebook.T + codebook.pow(2).sum(-1)).clamp_min(0)


def kmeans(x: torch.Tensor, k: int, iters: int = 25, distance: str = "l2", generator: torch.Generator | None = None) -> torch.Tensor:
    """Plain Lloyd k-means with k-means++ seeding; returns [k, D] centroids (empty clusters re-seeded)."""
    n = len(x)
    if n < k:  # too few points: repeat them with a little noise
        reps = x[torch.randint(n, (k - n,), generator=generator)]
        x = torch.cat([x, reps + 1e-3 * x.std() * torch.randn(reps.shape, generator=generator)])
        n = len(x)
    # k-means++ seeding
    centroids = [x[torch.randint(n, (1,), generator=generator)].squeeze(0)]
    d2 = pairwise_distance(x, centroids[0][None], distance).squeeze(1)
    for _ in range(1, k):
        probs = d2.clamp_min(0) + 1e-12
        i = torch.multinomial(probs / probs.sum(), 1, generator=generator)
        centroids.append(x[i].squeeze(0))
        d2 = torch.minimum(d2, pairwise_distance(x, x[i], distance).squeeze(1))
    c = torch.stack(centroids)
    for _ in range(iters):
        assign = pairwise_distance(x, c, distance).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            c[empty] = x[torch.randint(n, (int(empty.sum()),), generator=generator)]
    return c


@dataclass
class Quantized:
    codes: torch.Tensor  # [n, M] long
    z_q: torch.Tensor  # [n, D] sum of the chosen code vectors (no straight-through)
    residuals: list[torch.Tensor] = field(default_factory=list)  # M x [n, D]: r_l, input of level l
    vectors: list[torch.Tensor] = field(default_factory=list)  # M x [n, D]: c_l, code vector chosen at level l


@dataclass
class RQOutput:
    recon: torch.Tensor
    quant: Quantized
    loss: torch.Tensor
    recon_loss: torch.Tensor
    quant_loss: torch.Tensor


class RQVAE(nn.Module):
    def __init__(self, in_dim: int, cfg: RQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.in_dim = in_dim
        sizes = [in_dim, *cfg.hidden_layers(in_dim), cfg.code_dim]
        with torch.random.fork_rng(devices=[]):  # the initial weights follow cfg.seed, not what ran before
            torch.manual_seed(cfg.seed)
            self.encoder = mlp(sizes, cfg.dropout)
            self.decoder = mlp(sizes[::-1], cfg.dropout)
            self.codebooks = nn.ParameterList(
                [nn.Parameter(torch.randn(cfg.codebook_size, cfg.code_dim) / math.sqrt(cfg.code_dim)) for _ in range(cfg.levels)]
            )
        self.register_buffer("input_mean", torch.zeros(in_dim))
        self.register_buffer("input_scale", torch.ones(()))

    @property
    def level_sizes(self) -> list[int]:
        return [self.cfg.codebook_size] * self.cfg.levels

    def set_input_stats(self, x: torch.Tensor) -> None:
        if self.cfg.standardize:
            self.input_mean.copy_(x.mean(0))
            self.input_scale.copy_((x - x.mean(0)).pow(2).sum(-1).mean().sqrt().clamp_min(1e-8) / math.sqrt(x.shape[1]))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Input embedding -> latent z [n, D]."""
        return self.encoder((x - self.input_mean) / self.input_scale)

    def quantize(self, z: torch.Tensor) -> Quantized:
        residual = z
        codes, residuals, vectors = [], [], []
        for cb in self.codebooks:
            idx = pairwise_distance(residual.detach(), cb.detach(), self.cfg.distance).argmin(1)
            vec = cb[idx]
            codes.append(idx)
            residuals.append(residual)
            vectors.append(vec)
            residual = residual - vec.detach()  # the encoder gets gradients from every level's commitment term
        return Quantized(torch.stack(codes, 1), torch.stack(vectors).sum(0), residuals, vectors)

    def forward(self, x: torch.Tensor) -> RQOutput:
        z = self.embed(x)
        q = self.quantize(z)
        quant_loss = sum(F.mse_loss(v, r.detach()) + self.cfg.beta * F.mse_loss(r, v.detach()) for r, v in zip(q.residuals, q.vectors))
        z_st = z + (q.z_q - z).detach()  # straight-through
        recon = self.decoder(z_st)
        target = (x - self.input_mean) / self.input_scale
        recon_loss = F.mse_loss(recon, target)
        return RQOutput(recon, q, recon_loss + quant_loss, recon_loss, quant_loss)

    def fit(self, x: torch.Tensor, progress: bool = True) -> "RQVAE":
        self.history = train_rqvae(self, x, progress=progress)
        return self

    @torch.no_grad()
    def encode(self, x: torch.Tensor, batch_size: int = 8192, keep: torch.Tensor | None = None, margin: float = 0.0) -> torch.Tensor:
        """Codes [n, M] (before any collision handling).

        With `keep` (current codes [n, M]) the assignment is sticky: at each level an entity keeps its
        current code unless the nearest code is closer than it by more than `margin` (relative:
        d_keep > (1 + margin) * d_best), and the residual continues from the code chosen. Margin 0 is
        the plain nearest-code assignment; re-assigning a jointly trained tokenizer with it flips the
        near-ties of the deep levels (small residuals) on every re-assignment."""
        was = self.training
        self.eval()
        out = []
        for i in range(0, len(x), batch_size):
            z = self.embed(x[i:i + batch_size])
            if keep is None:
                out.append(self.quantize(z).codes)
                continue
            old, codes = keep[i:i + batch_size].to(z.device), []
            for level, cb in enumerate(self.codebooks):
                d = pairwise_distance(z, cb, self.cfg.distance)
                best = d.argmin(1)
                stay = d.gather(1, old[:, level:level + 1]).squeeze(1) <= (1 + margin) * d.gather(1, best[:, None]).squeeze(1)
                code = torch.where(stay, old[:, level], best)
                codes.append(code)
                z = z - cb[code]
            out.append(torch.stack(codes, 1))
        self.train(was)
        return torch.cat(out) if out else torch.zeros(0, self.cfg.levels, dtype=torch.long)

    @torch.no_grad()
    def last_level_distances(self, x: torch.Tensor) -> torch.Tensor:
        """[n, K] distances of each entity's last residual to the last codebook (for LC-Rec re-assignment)."""
        q = self.quantize(self.embed(x))
        return pairwise_distance(q.residuals[-1], self.codebooks[-1], self.cfg.distance)

    # ------------------------------------------------------------------ initialisation

    @torch.no_grad()
    def kmeans_init(self, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Each level's codebook = k-means of that level's residuals on a sample."""
        if len(x) > self.cfg.kmeans_sample:
            x = x[torch.randperm(len(x), generator=generator)[: self.cfg.kmeans_sample]]
        residual = self.embed(x)
        for cb in self.codebooks:
            cb.copy_(kmeans(residual, len(cb), self.cfg.kmeans_iters, self.cfg.distance, generator))
            residual = residual - cb[pairwise_distance(residual, cb, self.cfg.distance).argmin(1)]

    @torch.no_grad()
    def reseed_dead(self, usage: torch.Tensor, residuals: list[torch.Tensor], generator: torch.Generator | None = None) -> int:
        """Codes with usage 0 ([M, K] counts) take the level-l residual of a random recent input."""
        dead = usage == 0
        for level, cb in enumerate(self.codebooks):
            idx = dead[level].nonzero().squeeze(1)
            if len(idx):
                r = residuals[level]
                cb[idx] = r[torch.randint(len(r), (len(idx),), generator=generator)].detach()
        return int(dead.sum())


def train_rqvae(model: RQVAE, x: torch.Tensor, cfg: RQVAEConfig | None = None, progress: bool = True) -> dict:
    """Fit `model` on embeddings x [n, d]; returns a small history (losses per epoch, time)."""
    cfg = cfg or model.cfg
    with torch.random.fork_rng(devices=[]):  # the fit (dropout) follows cfg.seed and leaves the caller's RNG as it was,
        torch.manual_seed(cfg.seed)          # so the run's seed, not the index's, decides what is initialised next
        return _fit(model, x, cfg, progress)


def _fit(model: RQVAE, x: torch.Tensor, cfg: RQVAEConfig, progress: bool) -> dict:
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(cfg.seed)
    x = x.float()
    model.set_input_stats(x)
    start = time.perf_counter()
    if cfg.kmeans_init:
        model.kmeans_init(x, g)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = {"loss": [], "recon": [], "quant": [], "reseeded": 0, "epochs": 0}
    epochs = cfg.epochs
    if cfg.max_steps:  # whole epochs: the last one is never cut short
        epochs = max(1, min(epochs, math.ceil(cfg.max_steps / math.ceil(len(x) / cfg.batch_size))))
    bar = tqdm(range(epochs), desc="rq-vae", disable=not progress, unit="epoch")
    model.train()
    for epoch in bar:
        perm = torch.randperm(len(x), generator=g)
        usage = torch.zeros(cfg.levels, cfg.codebook_size, dtype=torch.long)
        tot = rec = qua = 0.0
        for i in range(0, len(x), cfg.batch_size):
            out = model(x[perm[i:i + cfg.batch_size]])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            n = len(out.recon)
            tot, rec, qua = tot + out.loss.item() * n, rec + out.recon_loss.item() * n, qua + out.quant_loss.item() * n
            for level in range(cfg.levels):
                usage[level] += torch.bincount(out.quant.codes[:, level], minlength=cfg.codebook_size)
        history["loss"].append(tot / len(x))
        history["recon"].append(rec / len(x))
        history["quant"].append(qua / len(x))
        history["epochs"] = epoch + 1
        if cfg.dead_code_reseed and epoch < epochs - 1:
            history["reseeded"] += model.reseed_dead(usage, out.quant.residuals, g)  # from the last batch
        bar.set_postfix(loss=f"{history['loss'][-1]:.4f}", recon=f"{history['recon'][-1]:.4f}")
        if cfg.max_minutes and time.perf_counter() - start > 60 * cfg.max_minutes:
            log.warning("rq-vae: stopping after %d of %d epochs (max_minutes=%s): this fit depends on the machine's "
                        "speed", epoch + 1, epochs, cfg.max_minutes)
            break
    model.eval()
    history["seconds"] = time.perf_counter() - start
    return history
