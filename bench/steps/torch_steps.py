#!/usr/bin/env python3
"""One training step of every paper model in PyTorch, the same models, sizes, losses,
optimizers and batches as Trainyard's `steps` bench (jobs/benches/steps.rs), for the ratio
table of bench/steps/run.sh.

    torch_steps.py --threads 1 --json out.jsonl [--models resnet,odenet,...] [--n-x 669]

Each model mirrors the job's code (the file it comes from is named in its builder):
layer sizes, initialisation rule (PyTorch's defaults, which the jobs copy), loss and
optimizer (SGD with momentum 0.9 for the MNIST models, Adam elsewhere, with the quick
preset's learning rates). The ODE models use the jobs' own dopri5 (torchdiffeq's
controller: RMS error norm, Hairer's first step, safety 0.9, factors 0.2/10, steps clipped
to land on t1), re-implemented below and differentiated by backprop through the solver
like ours, so both sides take as many function evaluations as their error control asks
for; the table shows the mean NFE of each.

Timing: `--warmup` steps, then up to `--iters` samples (stopping after `--budget` seconds
once there are 5), each the mean of `group` consecutive steps (3 for the latent-ODE
models: the observation count cycles 30, 50, 100); the median is reported.
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ALL = ["resnet", "odenet", "cnf", "planar", "latent_ode", "rnn", "gmdgm", "m2", "cnn", "dbvae"]


# ---------------------------------------------------------------- dopri5 (jobs/src/ode/dopri5.rs)
C = [0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0]
A = [
    [1 / 5],
    [3 / 40, 9 / 40],
    [44 / 45, -56 / 15, 32 / 9],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
    [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
]
B = A[5]
E = [
    35 / 384 - 1951 / 21600,
    0.0,
    500 / 1113 - 22642 / 50085,
    125 / 192 - 451 / 720,
    -2187 / 6784 + 12231 / 42400,
    11 / 84 - 649 / 6300,
    -1 / 60,
]


def rms(t):
    return float(t.detach().pow(2).mean().sqrt())


def combine(y, dt, coeffs, ks):
    out = y
    for c, k in zip(coeffs, ks):
        if c != 0.0:
            out = out + k * (c * dt)
    return out


def dopri5(f, y0, t0, t1, rtol, atol, stats):
    direction = 1.0 if t1 > t0 else -1.0
    f_y = f(t0, y0)
    stats["nfe"] += 2
    # Hairer's initial step
    y0d, f0 = y0.detach(), f_y.detach()
    sc = y0d.abs() * rtol + atol
    d0, d1 = rms(y0d / sc), rms(f0 / sc)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    with torch.no_grad():
        f1 = f(t0 + h0 * direction, y0d + f0 * (h0 * direction))
    d2 = rms((f1 - f0) / sc) / h0
    h1 = max(h0 * 1e-3, 1e-6) if d1 <= 1e-15 and d2 <= 1e-15 else (0.01 / max(d1, d2)) ** 0.2
    h = min(100 * h0, h1)
    t, y = t0, y0
    steps = 0
    while (t1 - t) * direction > 0:
        steps += 1
        if steps > 10000:
            raise RuntimeError("dopri5: too many steps")
        remaining = abs(t1 - t)
        last = h >= remaining
        dt = (remaining if last else h) * direction
        ks = [f_y]
        for i, row in enumerate(A):
            ks.append(f(t + C[i + 1] * dt, combine(y, dt, row, ks)))
        stats["nfe"] += 6
        y1 = combine(y, dt, B, ks[:6])
        with torch.no_grad():
            err = combine(torch.zeros_like(y), dt, E, [k.detach() for k in ks])
            tol = torch.maximum(y.detach().abs(), y1.detach().abs()) * rtol + atol
            ratio = rms(err / tol)
        accept = ratio <= 1.0
        if ratio == 0.0:
            factor = 10.0
        else:
            factor = min(max(0.9 * ratio ** -0.2, 1.0 if accept else 0.2), 10.0)
        h_next = abs(dt) * factor
        if accept:
            t = t1 if last else t + dt
            y = y1
            f_y = ks[6]
        h = h_next
    return y


# ---------------------------------------------------------------- neural-ode mnist (models.rs)
def gn(c, groups):
    return nn.GroupNorm(min(groups, c), c, eps=1e-5)


class Stem(nn.Module):
    def __init__(self, c, g):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c, 3, 1, 0)
        self.norm1 = gn(c, g)
        self.conv2 = nn.Conv2d(c, c, 4, 2, 1)
        self.norm2 = gn(c, g)
        self.conv3 = nn.Conv2d(c, c, 4, 2, 1)

    def forward(self, x):
        x = self.conv1(x)
        x = self.conv2(F.relu(self.norm1(x)))
        return self.conv3(F.relu(self.norm2(x)))


class Head(nn.Module):
    def __init__(self, c, g):
        super().__init__()
        self.norm = gn(c, g)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        return self.fc(F.relu(self.norm(x)).mean(dim=(2, 3)))


class ResBlock(nn.Module):
    def __init__(self, c, g):
        super().__init__()
        self.norm1 = gn(c, g)
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.norm2 = gn(c, g)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(out))) + x


class ResNet(nn.Module):
    def __init__(self, c, g):
        super().__init__()
        self.stem = Stem(c, g)
        self.blocks = nn.Sequential(*[ResBlock(c, g) for _ in range(6)])
        self.head = Head(c, g)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class ConcatConv2d(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in + 1, c_out, 3, 1, 1)

    def forward(self, t, x):
        tt = torch.full_like(x[:, :1], float(t))
        return self.conv(torch.cat([tt, x], 1))


class OdeFunc(nn.Module):
    def __init__(self, c, g):
        super().__init__()
        self.norm1, self.conv1 = gn(c, g), ConcatConv2d(c, c)
        self.norm2, self.conv2 = gn(c, g), ConcatConv2d(c, c)
        self.norm3 = gn(c, g)

    def forward(self, t, x):
        out = self.conv1(t, F.relu(self.norm1(x)))
        out = self.conv2(t, F.relu(self.norm2(out)))
        return self.norm3(out)


class OdeNet(nn.Module):
    def __init__(self, c, g, tol):
        super().__init__()
        self.stem, self.func, self.head = Stem(c, g), OdeFunc(c, g), Head(c, g)
        self.tol = tol
        self.stats = {"nfe": 0}

    def forward(self, x):
        h = self.stem(x)
        self.stats = {"nfe": 0}
        h = dopri5(self.func, h, 0.0, 1.0, self.tol, self.tol, self.stats)
        return self.head(h)


def mnist_bench(name, batch=32, width=32, groups=8, lr=0.05, tol=0.1):
    torch.manual_seed(0)
    model = ResNet(width, groups) if name == "resnet" else OdeNet(width, groups, tol)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x = torch.rand(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    nfe = (lambda: model.stats["nfe"]) if name == "odenet" else (lambda: None)
    return batch, 1, step, nfe


# ---------------------------------------------------------------- neural-ode cnf (cnf.rs)
BASE_VAR = 0.1


def base_log_prob(z):
    return -0.5 / BASE_VAR * z.pow(2).sum(1) - math.log(2 * math.pi * BASE_VAR)


class HyperNet(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = nn.Linear(1, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 3 * width * 2 + width)
        self.width = width

    def forward(self, t):
        m = self.width
        p = torch.tanh(self.fc1(torch.tensor([[float(t)]])))
        p = self.fc3(torch.tanh(self.fc2(p)))[0]
        w = p[: 2 * m].reshape(m, 2)
        u = p[2 * m : 4 * m].reshape(m, 2)
        g = p[4 * m : 6 * m].reshape(m, 2)
        b = p[6 * m :]
        return w, u * torch.sigmoid(g), b


class Cnf(nn.Module):
    def __init__(self, width=64, hidden=32, t1=10.0, tol=1e-3):
        super().__init__()
        self.hyper = HyperNet(width, hidden)
        self.t1, self.tol = t1, tol
        self.stats = {"nfe": 0}

    def dynamics(self, t, s):
        z = s[:, :2]
        w, u, b = self.hyper(t)
        inv_m = 1.0 / self.hyper.width
        h = torch.tanh(z @ w.t() + b)
        dz = (h @ u) * inv_m
        uw = (u * w).sum(1, keepdim=True)
        trace = ((1 - h * h) @ uw) * inv_m
        return torch.cat([dz, -trace], 1)

    def log_prob(self, x):
        s0 = torch.cat([x, torch.zeros(x.shape[0], 1)], 1)
        self.stats = {"nfe": 0}
        s = dopri5(self.dynamics, s0, self.t1, 0.0, self.tol, self.tol, self.stats)
        return base_log_prob(s[:, :2]) - s[:, 2]


class Planar(nn.Module):
    def __init__(self, layers=32):
        super().__init__()
        bound = 1 / math.sqrt(2)
        self.w = nn.Parameter(torch.empty(layers, 2).uniform_(-bound, bound))
        self.u = nn.Parameter(torch.empty(layers, 2).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.zeros(layers))
        self.layers = layers

    def log_prob(self, x):
        z = x
        logdet = torch.zeros(x.shape[0])
        for k in range(self.layers):
            w, u, b = self.w[k : k + 1], self.u[k : k + 1], self.b[k : k + 1].reshape(1, 1)
            wu = (w * u).sum(1, keepdim=True)
            ww = w.pow(2).sum(1, keepdim=True)
            coef = (F.softplus(wu) - 1 - wu) / (ww + 1e-8)
            u_hat = u + w * coef
            w_u_hat = (w * u_hat).sum(1, keepdim=True)
            h = torch.tanh(z @ w.t() + b)
            z = z + h * u_hat
            det = (1 - h * h) * w_u_hat + 1
            logdet = logdet + torch.log(det.clamp_min(1e-12)).squeeze(1)
        return base_log_prob(z) + logdet


def eight_gaussians(n, gen):
    centers = torch.tensor(
        [[math.cos(k * math.pi / 4), math.sin(k * math.pi / 4)] for k in range(8)]
    ) * 2.0
    idx = torch.randint(0, 8, (n,), generator=gen)
    return centers[idx] + 0.1 * torch.randn(n, 2, generator=gen)


def cnf_bench(name, batch=256, lr=5e-3):
    torch.manual_seed(0)
    model = Cnf() if name == "cnf" else Planar()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)

    def step():
        x = eight_gaussians(batch, gen)
        opt.zero_grad(set_to_none=True)
        loss = -model.log_prob(x).mean()
        loss.backward()
        opt.step()
        return loss.item()

    nfe = (lambda: model.stats["nfe"]) if name == "cnf" else (lambda: None)
    return batch, 1, step, nfe


# ---------------------------------------------------------------- neural-ode latent-ode (latent.rs)
WINDOW, EXTRAP, N_OBS = 100, 50, [30, 50, 100]


class LatentOde(nn.Module):
    def __init__(self, latent=4, rnn=25, hidden=20):
        super().__init__()
        self.cell = nn.Linear(3 + rnn, rnn)
        self.out = nn.Linear(rnn, 2 * latent)
        self.l1, self.l2, self.l3 = nn.Linear(latent, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, latent)
        self.dec1, self.dec2 = nn.Linear(latent, hidden), nn.Linear(hidden, 2)
        self.rnn, self.latent = rnn, latent

    def f(self, z):
        return self.l3(F.elu(self.l2(F.elu(self.l1(z)))))

    def decode(self, z0, ts):
        z, zs = z0, [z0]
        for t0, t1 in zip(ts[:-1], ts[1:]):  # RK4, one step per interval
            h = t1 - t0
            k1 = self.f(z)
            k2 = self.f(z + k1 * (h / 2))
            k3 = self.f(z + k2 * (h / 2))
            k4 = self.f(z + k3 * h)
            z = z + (k1 + 2 * k2 + 2 * k3 + k4) * (h / 6)
            zs.append(z)
        return self.dec2(F.relu(self.dec1(torch.stack(zs, 1))))

    def neg_elbo(self, xs, targets, mask, ts, eps, noise_std):
        h = torch.zeros(xs[0].shape[0], self.rnn)
        for x in reversed(xs):
            h = torch.tanh(self.cell(torch.cat([x, h], 1)))
        out = self.out(h)
        mu, logvar = out[:, : self.latent], out[:, self.latent :]
        z0 = mu + torch.exp(0.5 * logvar) * eps
        pred = self.decode(z0, ts)
        var = noise_std**2
        sq = (pred - targets).pow(2) * mask
        log_norm = 0.5 * math.log(2 * math.pi * var)
        per_point = (sq / (2 * var)).sum(-1) + mask.squeeze(2) * (2 * log_norm)
        kl = 0.5 * (logvar.exp() + mu.pow(2) - 1 - logvar).sum(1)
        return (per_point.sum(1) + kl).mean()


class Rnn(nn.Module):
    def __init__(self, hidden=25):
        super().__init__()
        self.cell, self.out, self.hidden = nn.Linear(3 + hidden, hidden), nn.Linear(hidden, 2), hidden

    def loss(self, obs, idx, ts):
        # obs [n, 150, 2], idx [n, k] sorted observed grid indices
        n, k = idx.shape
        xg = torch.gather(obs, 1, idx.unsqueeze(2).expand(n, k, 2))
        tg = ts[idx].unsqueeze(2)
        h = torch.zeros(n, self.hidden)
        loss = torch.zeros(())
        for s in range(1, k):
            h = torch.tanh(self.cell(torch.cat([xg[:, s - 1], tg[:, s] - tg[:, s - 1], h], 1)))
            loss = loss + (self.out(h) - xg[:, s]).pow(2).sum(1).mean()
        return loss / (max(k, 2) - 1)


def latent_bench(name, n=300, lr=0.01, noise=0.3):
    torch.manual_seed(0)
    length = WINDOW + EXTRAP
    ts_list = [6 * math.pi * i / 999 for i in range(length)]
    ts = torch.tensor(ts_list)
    obs = torch.randn(n, length, 2)
    batches = []
    for k in N_OBS:
        idx = torch.sort(torch.stack([torch.randperm(WINDOW)[:k] for _ in range(n)]), 1).values
        mask = torch.zeros(n, length, 1)
        mask.scatter_(1, idx.unsqueeze(2), 1.0)
        targets = obs * mask
        xs = [
            torch.cat([obs[torch.arange(n), idx[:, j]], ts[idx[:, j]].unsqueeze(1)], 1)
            for j in range(k)
        ]
        batches.append((idx, mask, targets, xs))
    model = LatentOde() if name == "latent_ode" else Rnn()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    state = {"i": 0}

    def step():
        idx, mask, targets, xs = batches[state["i"] % 3]
        state["i"] += 1
        opt.zero_grad(set_to_none=True)
        if name == "latent_ode":
            loss = model.neg_elbo(xs, targets, mask, ts_list, torch.randn(n, 4), max(noise, 1e-3))
        else:
            loss = model.loss(targets, idx, ts)
        loss.backward()
        opt.step()
        return loss.item()

    return n, 3, step, lambda: None


# ---------------------------------------------------------------- gm-dgm (gm_dgm/models.rs)
LOG_2PI = math.log(2 * math.pi)


def mlp_init_(model):
    # the job's init (gm_dgm::models::init_params): Glorot-normal hidden weights, N(0, 1e-3)
    # output layers and biases; the step's cost does not depend on it.
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("weight") and p.dim() == 2:
                p.normal_(0, math.sqrt(2 / sum(p.shape)))
            else:
                p.normal_(0, 1e-3)


class SemiVae(nn.Module):
    def __init__(self, kind, nx, ny=15, nz=32, nh=256, p_y=None):
        super().__init__()
        self.kind, self.ny = kind, ny
        self.c_h1, self.c_h2, self.c_out = nn.Linear(nx, nh), nn.Linear(nh, nh), nn.Linear(nh, ny)
        self.e_x, self.e_y = nn.Linear(nx, nh), nn.Linear(ny, nh, bias=False)
        self.e_h2, self.e_mu, self.e_lv = nn.Linear(nh, nh), nn.Linear(nh, nz), nn.Linear(nh, nz)
        self.d_z = nn.Linear(nz, nh)
        self.d_y = nn.Linear(ny, nh, bias=False) if kind == "m2" else None
        self.d_h2, self.d_out = nn.Linear(nh, nh), nn.Linear(nh, nx)
        if kind == "gmdgm":
            self.p_mean, self.p_lv = nn.Linear(ny, nz), nn.Linear(ny, nz)
        self.register_buffer("log_py", torch.log(torch.tensor(p_y, dtype=torch.float32)).unsqueeze(1))
        mlp_init_(self)

    def classify(self, x):
        return self.c_out(F.relu(self.c_h2(F.relu(self.c_h1(x)))))

    def bound(self, x, hx, y, eps):
        h = F.relu(self.e_h2(F.relu(hx + self.e_y(y))))
        mu, logvar = self.e_mu(h), self.e_lv(h)
        z = mu + torch.exp(0.5 * logvar) * eps
        log_q = -0.5 * (logvar + eps.pow(2) + LOG_2PI).sum(-1)
        if self.kind == "m2":
            log_pz = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
        else:
            pm, plv = self.p_mean(y), self.p_lv(y)
            log_pz = -0.5 * (plv + (z - pm).pow(2) * torch.exp(-plv) + LOG_2PI).sum(-1)
        hd = self.d_z(z)
        if self.d_y is not None:
            hd = hd + self.d_y(y)
        logits = self.d_out(F.relu(self.d_h2(F.relu(hd))))
        softplus = F.relu(logits) + torch.log(torch.exp(-logits.abs()) + 1)
        log_px = (x * logits - softplus).sum(-1)
        log_py = (y @ self.log_py).squeeze(1)
        return log_px + log_py + log_pz - log_q

    def loss(self, xl, yl, eps_l, xu, eps_u, alpha):
        ny = self.ny
        y1 = F.one_hot(yl, ny).float()
        lb = self.bound(xl, self.e_x(xl), y1, eps_l).mean()
        b, nx = xu.shape
        log_qy = F.log_softmax(self.classify(xu), -1)
        qy = log_qy.exp()
        hx = self.e_x(xu)
        hx_rows = hx.unsqueeze(1).expand(b, ny, hx.shape[1]).reshape(b * ny, -1)
        x_rows = xu.unsqueeze(1).expand(b, ny, nx).reshape(b * ny, nx)
        y_rows = torch.eye(ny).unsqueeze(0).expand(b, ny, ny).reshape(b * ny, ny)
        l = self.bound(x_rows, hx_rows, y_rows, eps_u).reshape(b, ny)
        u = ((qy * l).sum(-1) - (qy * log_qy).sum(-1)).mean()
        nll = F.nll_loss(F.log_softmax(self.classify(xl), -1), yl)
        return alpha * nll - (lb + u)


def class_prior(classes=10, masked=(0, 1, 2, 3, 4), extra=5):
    share = (1 - (classes - len(masked)) / classes) / (len(masked) + extra)
    p = [1 / classes if (k < classes and k not in masked) else share for k in range(classes + extra)]
    s = sum(p)
    return [v / s for v in p]


def gmdgm_bench(name, n_x, batch=100, lr=1e-3, alpha=1.1, l2_reg=0.5, clip=1.0, n_train=10000):
    torch.manual_seed(0)
    model = SemiVae(name, n_x, p_y=class_prior())
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)

    def step():
        xl = (torch.rand(batch, n_x, generator=gen) < 0.3).float()
        xu = (torch.rand(batch, n_x, generator=gen) < 0.3).float()
        yl = torch.randint(5, 10, (batch,), generator=gen)
        eps_l = torch.randn(batch, 32, generator=gen)
        eps_u = torch.randn(batch * 15, 32, generator=gen)
        opt.zero_grad(set_to_none=True)
        total = model.loss(xl, yl, eps_l, xu, eps_u, alpha)
        total = total + 0.5 * l2_reg / n_train * torch.stack([w.pow(2).sum() for w in weights]).sum()
        total.backward()
        for p in model.parameters():
            if p.grad is not None:
                p.grad.clamp_(-clip, clip)
        opt.step()
        return total.item()

    return batch, 1, step, lambda: None


# ---------------------------------------------------------------- db-vae (db_vae/models.rs)
class Encoder(nn.Module):
    def __init__(self, outputs, hidden=256):
        super().__init__()
        specs = [(1, 12, 5, 2, 2), (12, 24, 5, 2, 2), (24, 48, 3, 2, 1), (48, 72, 3, 1, 1)]
        self.convs = nn.ModuleList([nn.Conv2d(ci, co, k, s, p) for ci, co, k, s, p in specs])
        self.norms = nn.ModuleList([nn.GroupNorm(4, co, eps=1e-5) for _, co, _, _, _ in specs])
        self.fc1 = nn.Linear(72 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, outputs)

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = norm(F.relu(conv(x)))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class Decoder(nn.Module):
    def __init__(self, latent):
        super().__init__()
        self.fc = nn.Linear(latent, 72 * 4 * 4)
        self.deconvs = nn.ModuleList(
            [nn.ConvTranspose2d(ci, co, k, 2, 1) for ci, co, k in [(72, 48, 3), (48, 24, 4), (24, 1, 4)]]
        )

    def forward(self, z):
        h = F.relu(self.fc(z)).reshape(-1, 72, 4, 4)
        for i, d in enumerate(self.deconvs):
            h = d(h)
            h = torch.sigmoid(h) if i == len(self.deconvs) - 1 else F.relu(h)
        return h


def bce_with_logits(logit, target):
    return F.relu(logit) - logit * target + torch.log(torch.exp(-logit.abs()) + 1)


def dbvae_bench(name, batch=64, latent=16, hidden=256, lr=5e-4, kl_weight=5e-4):
    torch.manual_seed(0)
    n_pos = batch // 2
    if name == "cnn":
        enc = Encoder(1, hidden)
        params = list(enc.parameters())
    else:
        enc, dec = Encoder(2 * latent + 1, hidden), Decoder(latent)
        params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    x = torch.rand(batch, 1, 28, 28)
    target = torch.cat([torch.ones(n_pos), torch.zeros(batch - n_pos)])

    def step():
        opt.zero_grad(set_to_none=True)
        out = enc(x)
        if name == "cnn":
            loss = bce_with_logits(out.squeeze(1), target).mean()
        else:
            class_sum = bce_with_logits(out[:, 0], target).sum()
            mu, logvar = out[:n_pos, 1 : 1 + latent], out[:n_pos, 1 + latent :]
            z = mu + torch.exp(0.5 * logvar) * torch.randn(n_pos, latent)
            x_hat = dec(z)
            kl = 0.5 * (logvar.exp() + mu.pow(2) - logvar - 1).sum(-1)
            recon = (x[:n_pos] - x_hat).abs().flatten(1).mean(-1)
            loss = (class_sum + (kl * kl_weight + recon).sum()) / batch
        loss.backward()
        opt.step()
        return loss.item()

    return batch, 1, step, lambda: None


# ---------------------------------------------------------------- harness
def build(name, args):
    if name in ("resnet", "odenet"):
        return mnist_bench(name)
    if name in ("cnf", "planar"):
        return cnf_bench(name)
    if name in ("latent_ode", "rnn"):
        return latent_bench(name)
    if name in ("gmdgm", "m2"):
        if not args.n_x:
            raise SystemExit("--n-x (the pixels gm-dgm keeps; ours reports it) is needed")
        return gmdgm_bench(name, args.n_x)
    if name in ("cnn", "dbvae"):
        return dbvae_bench(name)
    raise SystemExit(f"unknown model {name}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default=",".join(ALL))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--budget", type=float, default=20.0)
    ap.add_argument("--n-x", type=int, default=0)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = open(args.json, "a") if args.json else None
    print(f"{'model':<11} {'batch':>6} {'threads':>7} {'median ms':>10} {'min ms':>10} {'samples':>8} {'NFE':>5}")
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        batch, group, step, nfe = build(name, args)
        for _ in range(args.warmup * group):
            step()
        ms, nfes = [], []
        started = time.perf_counter()
        while len(ms) < args.iters and (len(ms) < 5 or time.perf_counter() - started < args.budget):
            t = time.perf_counter()
            for _ in range(group):
                loss = step()
                if not math.isfinite(loss):
                    raise SystemExit(f"{name}: loss {loss}")
                if nfe() is not None:
                    nfes.append(nfe())
            ms.append((time.perf_counter() - t) * 1e3 / group)
        ms.sort()
        k = len(ms)
        median = ms[k // 2] if k % 2 else 0.5 * (ms[k // 2 - 1] + ms[k // 2])
        mean_nfe = sum(nfes) / len(nfes) if nfes else None
        print(
            f"{name:<11} {batch:>6} {args.threads:>7} {median:>10.2f} {ms[0]:>10.2f} {k:>8} "
            f"{'-' if mean_nfe is None else f'{mean_nfe:.1f}':>5}",
            flush=True,
        )
        if out:
            out.write(json.dumps({
                "impl": "torch", "model": name, "batch": batch, "threads": args.threads,
                "median_ms": median, "min_ms": ms[0], "samples": k, "nfe": mean_nfe,
                "torch": torch.__version__,
            }) + "\n")
            out.flush()


if __name__ == "__main__":
    sys.exit(main())
