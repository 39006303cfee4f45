"""Build notebooks/tutorial.ipynb (outputs cleared) from the cells below.

Edit this file, not the .ipynb, then run ``python notebooks/make_tutorial.py``. tests/test_notebook.py executes
the notebook and checks that this script still writes exactly the stored file.
"""

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
NOTEBOOK = HERE / "tutorial.ipynb"

CELLS: list[tuple[str, str]] = []


def md(text: str) -> None:
    CELLS.append(("markdown", text.strip("\n")))


def code(text: str) -> None:
    CELLS.append(("code", text.strip("\n")))


# ----------------------------------------------------------------------------------------------------------------
md(r"""
# Tensors, Tucker-2 and a rank search: a tutorial

This notebook walks from the basic vocabulary of tensors to what `ranksearch` does with it:

1. tensors, fibers, slices and mode-$n$ unfoldings with [TensorLy](https://tensorly.org);
2. the $n$-mode product;
3. the CP and Tucker decompositions;
4. Tucker-2 of one convolution layer with `ranksearch`'s own code: weights, MACs and error;
5. loading a `ranksearch` study and plotting its Pareto front (validation accuracy vs MACs).

It runs top to bottom on a laptop CPU in well under a minute. Run it from the `notebooks/` folder (Jupyter does
that when you open it there). Every number the text claims is checked by an `assert` next to it.

Notation follows Kolda & Bader, *Tensor Decompositions and Applications*, SIAM Review 51(3), 2009, with one
difference: **Python counts modes from 0**, the paper from 1. The paper's "mode-1" is mode 0 here.
""")

code(r"""
import os
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import tensorly as tl
import torch

tl.set_backend("numpy")  # sections 1-3 use plain NumPy arrays; ranksearch itself runs TensorLy on PyTorch
np.set_printoptions(linewidth=120, precision=4, suppress=True)
torch.manual_seed(0)
# Everything here is small: one thread is as fast, and stays fast when other programs keep the cores busy
# (several threads then wait on each other and HOOI can take 100x longer).
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm, imported by thop, in a bare kernel
print("TensorLy", tl.__version__, "| PyTorch", torch.__version__)
""")

# ----------------------------------------------------------------------------------------------------------------
md(r"""
## 1. Tensors with TensorLy

A tensor of order 3 is a 3-way array $\mathcal{X} \in \mathbb{R}^{I_0 \times I_1 \times I_2}$ with entries
$x_{ijk}$. Our running example is a $3 \times 4 \times 2$ tensor holding $0, 1, \dots, 23$ in C order, so that
$x_{ijk} = 8i + 2j + k$.
""")

code(r"""
X = tl.tensor(np.arange(24).reshape(3, 4, 2))
print("shape", X.shape, "| order", X.ndim, "| x[1, 2, 0] =", X[1, 2, 0])
assert X.shape == (3, 4, 2) and X[1, 2, 0] == 8 * 1 + 2 * 2 + 0
""")

md(r"""
### Fibers

A **fiber** fixes every index but one. The mode-$n$ fibers are the vectors you get by letting index $n$ run:

| fiber | Python | how many | length |
|---|---|---|---|
| mode-0 (columns) | `X[:, j, k]` | $4 \cdot 2 = 8$ | 3 |
| mode-1 (rows) | `X[i, :, k]` | $3 \cdot 2 = 6$ | 4 |
| mode-2 (tubes) | `X[i, j, :]` | $3 \cdot 4 = 12$ | 2 |
""")

code(r"""
print("a mode-0 fiber (column) X[:, 1, 0] =", X[:, 1, 0])
print("a mode-1 fiber (row)    X[2, :, 1] =", X[2, :, 1])
print("a mode-2 fiber (tube)   X[0, 3, :] =", X[0, 3, :])
fibers = {n: X.size // X.shape[n] for n in range(X.ndim)}
print("number of mode-n fibers:", fibers)
assert fibers == {0: 8, 1: 6, 2: 12}
""")

md(r"""
### Slices

A **slice** fixes every index but two:

- horizontal slices $\mathbf{X}_{i::}$ = `X[i, :, :]` (shape $4 \times 2$),
- lateral slices $\mathbf{X}_{:j:}$ = `X[:, j, :]` (shape $3 \times 2$),
- frontal slices $\mathbf{X}_{::k}$ = `X[:, :, k]` (shape $3 \times 4$).
""")

code(r"""
for k in range(2):
    print(f"frontal slice X[:, :, {k}]\n{X[:, :, k]}")
print(f"lateral slice X[:, 0, :]\n{X[:, 0, :]}")
print(f"horizontal slice X[0, :, :]\n{X[0, :, :]}")
assert X[:, :, 0].shape == (3, 4) and X[:, 0, :].shape == (3, 2) and X[0, :, :].shape == (4, 2)
""")

md(r"""
### Mode-$n$ unfolding (matricization)

The mode-$n$ unfolding $\mathbf{X}_{(n)}$ lays the mode-$n$ fibers side by side as the columns of an
$I_n \times \prod_{m \ne n} I_m$ matrix. *Which* column each fiber lands in is a convention:

- **Kolda & Bader** put the remaining indices in Fortran order (the first remaining index varies fastest):
  `np.reshape(np.moveaxis(X, n, 0), (X.shape[n], -1), order="F")`;
- **TensorLy** `tl.unfold(X, n)` uses C order (the last remaining index varies fastest):
  `np.moveaxis(X, n, 0).reshape(X.shape[n], -1)`.
""")

code(r"""
def kolda_unfold(tensor, mode):
    # Mode-n unfolding as defined by Kolda & Bader (2009): remaining indices in Fortran order.
    return np.reshape(np.moveaxis(tensor, mode, 0), (tensor.shape[mode], -1), order="F")


def kolda_fold(matrix, mode, shape):
    # The inverse of kolda_unfold.
    rest = [size for m, size in enumerate(shape) if m != mode]
    return np.moveaxis(np.reshape(matrix, [shape[mode], *rest], order="F"), 0, mode)


for n in range(X.ndim):
    assert np.array_equal(tl.unfold(X, n), np.moveaxis(X, n, 0).reshape(X.shape[n], -1))
    print(f"mode {n}, TensorLy tl.unfold(X, {n}) (C order):\n{tl.unfold(X, n)}")
    print(f"mode {n}, Kolda-Bader (Fortran order):\n{kolda_unfold(X, n)}\n")
""")

md(r"""
Both matrices hold **the same fibers as columns, in a different column order**. Column $c$ of `tl.unfold` is
column `perm[c]` of the Kolda–Bader unfolding. (The two orders agree only when at most one remaining mode has
size above 1, e.g. for a matrix.)
""")

code(r"""
for n in range(X.ndim):
    ours, theirs = tl.unfold(X, n), kolda_unfold(X, n)
    assert sorted(map(tuple, ours.T)) == sorted(map(tuple, theirs.T))  # the same set of columns ...
    perm = [
        next(j for j in range(theirs.shape[1]) if np.array_equal(ours[:, c], theirs[:, j]))
        for c in range(ours.shape[1])
    ]
    assert np.array_equal(ours, theirs[:, perm])
    print(f"mode {n}: same {ours.shape[1]} fibers; column order of tl.unfold in Kolda-Bader's: {perm}")
    assert perm != list(range(ours.shape[1]))  # ... in a different order

# The paper's own example (its Eq. 2.1) fills the tensor 1..24 in Fortran order; its unfoldings match the paper.
P = np.arange(1, 25).reshape((3, 4, 2), order="F")
assert np.array_equal(kolda_unfold(P, 0)[0], [1, 4, 7, 10, 13, 16, 19, 22])
assert np.array_equal(kolda_unfold(P, 1)[0], [1, 2, 3, 13, 14, 15])
assert np.array_equal(kolda_unfold(P, 2)[0], np.arange(1, 13))
""")

md(r"""
### Refolding

`tl.fold(matrix, n, shape)` undoes `tl.unfold`; `kolda_fold` undoes `kolda_unfold`. Mixing the two conventions
silently scrambles the tensor, so pick one and stay with it. (All formulas of the form
$\mathbf{Y}_{(n)} = \mathbf{U}\mathbf{X}_{(n)}$ hold in either convention.)
""")

code(r"""
for n in range(X.ndim):
    assert np.array_equal(tl.fold(tl.unfold(X, n), n, X.shape), X)
    assert np.array_equal(kolda_fold(kolda_unfold(X, n), n, X.shape), X)
mixed = tl.fold(kolda_unfold(X, 0), 0, X.shape)
print("fold(kolda_unfold(X, 0)) == X ?", np.array_equal(mixed, X))
assert not np.array_equal(mixed, X)
""")

# ----------------------------------------------------------------------------------------------------------------
md(r"""
## 2. The $n$-mode product

Multiplying a tensor by a matrix $\mathbf{U} \in \mathbb{R}^{J \times I_n}$ along mode $n$ replaces every
mode-$n$ fiber $\mathbf{x}$ by $\mathbf{U}\mathbf{x}$:

$$(\mathcal{X} \times_1 \mathbf{U})_{ipk} = \sum_j u_{pj}\, x_{ijk}, \qquad
\mathcal{Y} = \mathcal{X} \times_n \mathbf{U} \iff \mathbf{Y}_{(n)} = \mathbf{U}\,\mathbf{X}_{(n)}.$$

Our $3 \times 4 \times 2$ tensor times a $5 \times 4$ matrix along mode 1 is $3 \times 5 \times 2$.
""")

code(r"""
rng = np.random.default_rng(0)
U = rng.standard_normal((5, 4))
Xf = X.astype(float)
Y = tl.tenalg.mode_dot(Xf, U, mode=1)
print("X x_1 U has shape", Y.shape)
assert Y.shape == (3, 5, 2)

assert np.allclose(Y, tl.fold(U @ tl.unfold(Xf, 1), 1, Y.shape))  # Y_(1) = U X_(1), TensorLy's unfolding
assert np.allclose(Y, kolda_fold(U @ kolda_unfold(Xf, 1), 1, Y.shape))  # ... and Kolda-Bader's
assert np.allclose(Y, np.einsum("pj,ijk->ipk", U, Xf))  # the sum written out

# Products along different modes commute: (X x_0 A) x_1 U == (X x_1 U) x_0 A
A = rng.standard_normal((2, 3))
assert np.allclose(
    tl.tenalg.mode_dot(tl.tenalg.mode_dot(Xf, A, 0), U, 1), tl.tenalg.mode_dot(tl.tenalg.mode_dot(Xf, U, 1), A, 0)
)
print("Y[:, :, 0] =\n", Y[:, :, 0])
""")

# ----------------------------------------------------------------------------------------------------------------
md(r"""
## 3. CP and Tucker

### CP (CANDECOMP/PARAFAC)

CP writes a tensor as a sum of $R$ rank-one tensors,
$\mathcal{X} \approx \sum_{r=1}^{R} \lambda_r\, \mathbf{a}_r \circ \mathbf{b}_r \circ \mathbf{c}_r$.
`tensorly.decomposition.parafac` fits it by alternating least squares. With `normalize_factors=True` every
factor column is scaled to unit norm and the scales move into the **weights** $\lambda_r$.

We test it on a $10 \times 12 \times 8$ tensor that is exactly CP rank 3, plus 1 % noise.
""")

code(r"""
from tensorly.decomposition import parafac, tucker


def rel_error(approx, target):
    return float(tl.norm(approx - target) / tl.norm(target))


rng = np.random.default_rng(1)
true_factors = [rng.standard_normal((size, 3)) for size in (10, 12, 8)]
T_clean = tl.cp_to_tensor((np.ones(3), true_factors))
noise = rng.standard_normal(T_clean.shape)
T = T_clean + 0.01 * tl.norm(T_clean) / tl.norm(noise) * noise  # 1 % noise

cp = parafac(T, rank=3, normalize_factors=True, init="svd", n_iter_max=200, random_state=0)
weights, factors = cp
print("weights (lambda_r):", weights)
print("factor shapes:", [f.shape for f in factors])
print("column norms of each factor:", [np.linalg.norm(f, axis=0).round(6) for f in factors])
assert all(np.allclose(np.linalg.norm(f, axis=0), 1) for f in factors)
print(f"rank-3 CP reconstruction error: {rel_error(tl.cp_to_tensor(cp), T):.4f}")
""")

md(r"""
The reconstruction error $\|\mathcal{X} - \hat{\mathcal{X}}\| / \|\mathcal{X}\|$ falls to the noise level (1 %)
at the true rank 3 and barely moves after it: beyond rank 3 the extra components only fit noise.
""")

code(r"""
cp_errors = {}
for rank in range(1, 6):
    fit = parafac(T, rank=rank, normalize_factors=True, init="svd", n_iter_max=200, random_state=0)
    cp_errors[rank] = rel_error(tl.cp_to_tensor(fit), T)
    print(f"CP rank {rank}: relative error {cp_errors[rank]:.4f}")
assert cp_errors[1] > 0.2 and cp_errors[3] < 0.02
""")

md(r"""
### Tucker

Tucker writes $\mathcal{X} \approx \mathcal{G} \times_0 \mathbf{A} \times_1 \mathbf{B} \times_2 \mathbf{C}$: a
small **core** $\mathcal{G} \in \mathbb{R}^{R_0 \times R_1 \times R_2}$ multiplied along every mode by a factor
matrix. `tensorly.decomposition.tucker` computes it by HOOI (higher-order orthogonal iteration), whose factors
have **orthonormal columns** ($\mathbf{A}^\top \mathbf{A} = \mathbf{I}$). The ranks $(R_0, R_1, R_2)$ are the
*multilinear rank*: the ranks of the three unfoldings.

Test tensor: $10 \times 12 \times 8$ of multilinear rank $(3, 4, 2)$, plus 1 % noise.
""")

code(r"""
rng = np.random.default_rng(2)
core_true = rng.standard_normal((3, 4, 2))
bases = [np.linalg.qr(rng.standard_normal((size, r)))[0] for size, r in zip((10, 12, 8), (3, 4, 2), strict=True)]
S_clean = tl.tucker_to_tensor((core_true, bases))
noise = rng.standard_normal(S_clean.shape)
S = S_clean + 0.01 * tl.norm(S_clean) / tl.norm(noise) * noise

core, tucker_factors = tucker(S, rank=[3, 4, 2], init="svd", random_state=0)
print("core shape:", core.shape, "| factor shapes:", [f.shape for f in tucker_factors])
assert core.shape == (3, 4, 2)
for f in tucker_factors:
    assert np.allclose(f.T @ f, np.eye(f.shape[1]))  # orthonormal columns
print("factors are orthonormal: A^T A = I for all three")

for ranks in ([1, 1, 1], [2, 2, 2], [3, 4, 2], [5, 5, 5], [10, 12, 8]):
    fit = tucker(S, rank=ranks, init="svd", random_state=0)
    err = rel_error(tl.tucker_to_tensor(fit), S)
    params = int(np.prod(ranks)) + sum(s * r for s, r in zip(S.shape, ranks, strict=True))
    print(f"Tucker ranks {ranks}: relative error {err:.4f}, {params} numbers instead of {S.size}")
    if ranks == [3, 4, 2]:
        assert err < 0.02
    if ranks == [10, 12, 8]:
        assert err < 1e-10  # full multilinear rank: exact
""")

md(r"""
Back to the small example: $x_{ijk} = 8i + 2j + k$. Every fiber is an affine function of one index, so it lies in
the span of $(1, 1, \dots)$ and $(0, 1, 2, \dots)$: each unfolding has rank 2, and a Tucker decomposition with a
$2 \times 2 \times 2$ core is exact.
""")

code(r"""
unfolding_ranks = [int(np.linalg.matrix_rank(tl.unfold(Xf, n))) for n in range(3)]
print("ranks of the unfoldings of X:", unfolding_ranks)
assert unfolding_ranks == [2, 2, 2]
exact = tucker(Xf, rank=[2, 2, 2], init="svd", random_state=0)
print(f"Tucker (2, 2, 2) of X: relative error {rel_error(tl.tucker_to_tensor(exact), Xf):.1e}")
assert rel_error(tl.tucker_to_tensor(exact), Xf) < 1e-10
""")

# ----------------------------------------------------------------------------------------------------------------
md(r"""
## 4. Tucker-2 of a convolution layer

A conv weight is a 4-way tensor $\mathcal{W} \in \mathbb{R}^{C_\text{out} \times C_\text{in} \times k \times k}$.
Tucker-2 (Kim et al. 2015, [arXiv 1511.06530](https://arxiv.org/abs/1511.06530)) decomposes only the two
channel modes and leaves the small spatial modes alone:

$$\mathcal{W} \approx \mathcal{G} \times_0 \mathbf{U}_\text{out} \times_1 \mathbf{U}_\text{in}, \qquad
\mathcal{G} \in \mathbb{R}^{R_\text{out} \times R_\text{in} \times k \times k}.$$

Convolving with $\mathcal{W}$ then becomes three convolutions in a row: a $1\times1$ conv
$C_\text{in} \to R_\text{in}$ (weights $\mathbf{U}_\text{in}^\top$), the $k\times k$ core conv
$R_\text{in} \to R_\text{out}$, and a $1\times1$ conv $R_\text{out} \to C_\text{out}$ (weights
$\mathbf{U}_\text{out}$).

`ranksearch` describes a rank by a **normalized rank** $r$ on the grid $\{1/32, \dots, 1\}$:
$R = \max(1, \mathrm{round}(r\,C_\text{out}))$, $R_\text{in} = \min(R, C_\text{in})$,
$R_\text{out} = \min(R, C_\text{out})$. Below: the $3\times3$, $64 \to 128$ conv of VGG16's second block at
$R = 32$, i.e. $r = 32/128 = 0.25$. `ranked_conv` makes a conv carrying that `rank` buffer;
`Tucker2Conv.from_conv` computes the factors (HOOI, TensorLy's `partial_tucker`) and builds the three layers.
""")

code(r"""
from ranksearch import count_macs
from ranksearch.decompose import (
    Tucker2Conv,
    conv_macs_per_pixel,
    reconstruction_error,
    should_decompose,
    tucker2_macs_per_pixel,
    tucker2_ranks,
)
from ranksearch.models import ranked_conv

torch.manual_seed(0)
conv = ranked_conv(64, 128)  # 3x3, padding 1, no bias, a `rank` buffer; freshly initialized weights
rank = 32 / 128
print("R_in, R_out =", tucker2_ranks(rank, 64, 128))
layer = Tucker2Conv.from_conv(conv, rank, method="hooi")
print(layer)
""")

md(r"""
**Weights.** $128 \cdot 64 \cdot 3 \cdot 3 = 73{,}728$ before;
$64 \cdot 32 + 32 \cdot 32 \cdot 3 \cdot 3 + 32 \cdot 128 = 2{,}048 + 9{,}216 + 4{,}096 = 15{,}360$ after.

**MACs** on a $64 \times 100 \times 100$ input (counted by `ranksearch.count_macs`, i.e. thop): every output
pixel costs $128 \cdot 64 \cdot 9$ multiply-accumulates before and $64 \cdot 32 + 32 \cdot 32 \cdot 9 + 32 \cdot 128$
after.
""")

code(r"""
params_before = sum(p.numel() for p in conv.parameters())
params_after = sum(p.numel() for p in layer.parameters())
print(f"weights: {params_before:,} -> {params_after:,} ({params_after / params_before:.3f}x)")
assert params_before == 128 * 64 * 3 * 3 == 73_728
assert params_after == 64 * 32 + 32 * 32 * 3 * 3 + 32 * 128 == 15_360

macs_before, _ = count_macs(conv, input_size=(1, 64, 100, 100))
macs_after, _ = count_macs(layer, input_size=(1, 64, 100, 100))
print(f"MACs on a 64x100x100 input: {macs_before:,} -> {macs_after:,} ({macs_after / macs_before:.3f}x)")
assert macs_before == 100 * 100 * 128 * 64 * 9 == 737_280_000
assert macs_after == 100 * 100 * (64 * 32 + 32 * 32 * 9 + 32 * 128) == 153_600_000
""")

md(r"""
**Error.** How far is the decomposed layer from the original? Two measures: the relative Frobenius error of the
weight tensor (`reconstruction_error`) and the relative difference of the outputs on a random input.
""")

code(r"""
x = torch.randn(1, 64, 100, 100)
with torch.no_grad():
    y, y_hat = conv(x), layer(x)
weight_error = reconstruction_error(conv, layer)
output_error = float(torch.linalg.norm(y - y_hat) / torch.linalg.norm(y))
print(f"weight error ||W - W_hat|| / ||W||        = {weight_error:.3f}")
print(f"output error ||y - y_hat|| / ||y|| (R=32)  = {output_error:.3f}")
assert weight_error > 0.5 and abs(output_error - weight_error) < 0.05
""")

md(r"""
That error is large, and it should be: a freshly initialized conv is i.i.d. noise, with no low-rank structure
for Tucker-2 to find (and on a white-noise input the output error simply tracks the weight error). Trained
convs are far more compressible, and `ranksearch` fine-tunes every decomposed network briefly before measuring
its accuracy.

To see what structure does, compare with a conv whose weight *is* Tucker-2 of rank 24, plus 5 % noise. The
table also shows the MACs of the Tucker-2 form relative to the conv: at $R = 128$ it would cost more than the
conv itself, so `decompose()` leaves such a conv as it is (`should_decompose`).
""")

code(r"""
g = torch.Generator().manual_seed(1)
u_out = torch.linalg.qr(torch.randn(128, 24, generator=g)).Q
u_in = torch.linalg.qr(torch.randn(64, 24, generator=g)).Q
w = torch.einsum("or,rshw,is->oihw", u_out, torch.randn(24, 24, 3, 3, generator=g), u_in)
noise = torch.randn(w.shape, generator=g)
structured = ranked_conv(64, 128)
with torch.no_grad():
    structured.weight.copy_(w + 0.05 * w.norm() / noise.norm() * noise)

ranks_R = [4, 8, 16, 24, 32, 48, 64, 96, 128]
errors = {"random init": [], "rank 24 + 5% noise": []}
print("   R   random  structured  MACs ratio  decomposed")
for R in ranks_R:
    for name, c in (("random init", conv), ("rank 24 + 5% noise", structured)):
        errors[name].append(reconstruction_error(c, Tucker2Conv.from_conv(c, R / 128)))
    r_in, r_out = tucker2_ranks(R / 128, 64, 128)
    ratio = tucker2_macs_per_pixel(conv, r_in, r_out) / conv_macs_per_pixel(conv)
    print(
        f"{R:4d}   {errors['random init'][-1]:.3f}   {errors['rank 24 + 5% noise'][-1]:.3f}"
        f"       {ratio:6.3f}      {should_decompose(conv, R / 128)}"
    )
assert errors["rank 24 + 5% noise"][ranks_R.index(24)] < 0.06
assert not should_decompose(conv, 1.0) and should_decompose(conv, 0.25)

fig, ax = plt.subplots(figsize=(6, 3.5))
for name, errs in errors.items():
    ax.plot(ranks_R, errs, marker="o", label=name)
ax.axvline(32, color="grey", linestyle=":", label="R = 32 (r = 0.25)")
ax.set_xlabel("Tucker-2 rank R")
ax.set_ylabel("relative weight error")
ax.set_title("3x3 conv 64 -> 128: reconstruction error vs rank")
ax.legend()
plt.show()
""")

md(r"""
### The whole network

`set_ranks` writes one normalized rank per block into the `rank` buffers, and `decompose` replaces every conv
that gets cheaper by its Tucker-2 form. Here at quarter width (`width=0.25`, the model of `configs/cpu.yaml`),
which decomposes in a second or two; full width works the same but HOOI on the 512-channel convs takes minutes
on a CPU.
""")

code(r"""
from ranksearch import decompose, set_ranks, vgg16_cifar
from ranksearch.models import get_ranks

model = vgg16_cifar(width=0.25)
set_ranks(model, [1.0, 16 / 32, 8 / 32, 8 / 32, 4 / 32])
small = decompose(model)
(macs0, params0), (macs1, params1) = count_macs(model), count_macs(small)
print("ranks per block:", get_ranks(small))
print(f"MACs   {macs0:,} -> {macs1:,} ({macs1 / macs0:.3f}x)")
print(f"params {params0:,} -> {params1:,} ({params1 / params0:.3f}x)")
print("block 2 now:", small.features.block2[0])
assert macs1 < macs0 and params1 < params0
assert isinstance(small.features.block1[0], torch.nn.Conv2d)  # r = 1: kept as it is
""")

# ----------------------------------------------------------------------------------------------------------------
md(r"""
## 5. A study and its Pareto front

`python -m ranksearch run` stores its search in an Optuna study: each trial picks `rank_block1` ...
`rank_block5` (normalized ranks $k/32$), decomposes the pretrained baseline, fine-tunes it briefly and records two
values, **validation accuracy** (a fraction, maximized) and **MACs** (minimized). Trial user attributes add
`macs_ratio` and `params_ratio` (relative to the baseline) and more; system attributes hold `conv_ranks` (every
conv's integer rank). The study's `baseline` attribute holds the undecomposed model's `val_accuracy`,
`test_accuracy`, `macs` and `params`.

No trial is best in both values at once; the **Pareto front** (`study.best_trials`) is the set of trials that no
other trial beats in both. The study is found through two environment variables, with the CPU config's study
as the default:
""")

code(r"""
import optuna
import pandas as pd

from ranksearch.models import RANK_STEPS
from ranksearch.study.storage import load_existing_study
from ranksearch.utils.errors import UserError

STORAGE = os.environ.get("RANKSEARCH_STUDY_STORAGE", "sqlite:///../studies/vgg16-cifar10-cpu.db")
STUDY = os.environ.get("RANKSEARCH_STUDY_NAME", "vgg16-cifar10-cpu")

study, problem = None, None
if STORAGE.startswith("sqlite:///") and not Path(STORAGE.removeprefix("sqlite:///")).is_file():
    problem = f"there is no study database at {Path(STORAGE.removeprefix('sqlite:///')).resolve()}"
else:
    try:
        study = load_existing_study(STORAGE, STUDY)
    except UserError as error:
        problem = str(error)
if study is None:
    print(f"No study to show: {problem}.\n")
    print(
        "Make one from the repository root (about 10 minutes on 2 CPU cores), then re-run this section:\n"
        "    python -m ranksearch run --trials 20 --config configs/cpu.yaml --data-dir /path/to/cifar10\n"
        "(--data-dir: an ImageFolder tree or torchvision's CIFAR-10 folder; without one, CIFAR-10 is downloaded\n"
        "into data/), or point RANKSEARCH_STUDY_STORAGE / RANKSEARCH_STUDY_NAME at another study."
    )
else:
    complete = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
    print(f"study {study.study_name!r}: {len(study.trials)} trials, {len(complete)} complete")
    print("baseline:", study.user_attrs.get("baseline"))
    if not complete:
        print("No complete trial yet: let `python -m ranksearch run` finish one, then re-run this section.")
        study = None
""")

code(r"""
def ranks_text(params):
    # The normalized ranks of a trial as k/32, one column per block.
    names = sorted((p for p in params if p.startswith("rank_")), key=lambda p: (len(p), p))
    return {p.removeprefix("rank_"): f"{round(params[p] * RANK_STEPS)}/{RANK_STEPS}" for p in names}


if study is not None:
    pareto = sorted(study.best_trials, key=lambda t: t.values[1])
    front = pd.DataFrame(
        [
            {
                "trial": t.number,
                **ranks_text(t.params),
                "val_accuracy": t.values[0],
                "MACs": int(t.values[1]),
                "macs_ratio": t.user_attrs.get("macs_ratio"),
                "params_ratio": t.user_attrs.get("params_ratio"),
            }
            for t in pareto
        ]
    ).set_index("trial")
    print(f"Pareto front: {len(pareto)} of {len(complete)} complete trials")
    display(front)
""")

code(r"""
if study is not None:
    baseline = study.user_attrs.get("baseline")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.scatter(
        [t.user_attrs["macs_ratio"] for t in complete],
        [t.values[0] for t in complete],
        color="lightgrey",
        edgecolor="grey",
        label="all trials",
    )
    ax.step(front["macs_ratio"], front["val_accuracy"], where="post", color="tab:red", alpha=0.5)
    ax.scatter(front["macs_ratio"], front["val_accuracy"], color="tab:red", zorder=3, label="Pareto front")
    for number, row in front.iterrows():
        ax.annotate(
            str(number),
            (row["macs_ratio"], row["val_accuracy"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    if baseline:
        ax.scatter(
            [1.0],
            [baseline["val_accuracy"]],
            marker="*",
            s=200,
            color="black",
            zorder=3,
            label=f"baseline ({baseline['macs']:,} MACs)",
        )
    ax.set_xlabel("MACs relative to the baseline")
    ax.set_ylabel("validation accuracy")
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
    ax.set_title(f"study {study.study_name}: accuracy vs MACs")
    ax.legend(loc="lower right")
    plt.show()
""")

md(r"""
## Where next

- Export a Pareto trial as a model file (`.pt`, ONNX, TorchScript), re-checked against the study:

  ```bash
  python -m ranksearch export --study-name vgg16-cifar10-cpu --trial best --max-drop 5 \
      --finetune-epochs 2 --out model.pt
  ```

  (`--trial best` takes the Pareto trial with the fewest MACs within `--max-drop` points of the baseline's
  validation accuracy, 1 by default: a CPU study's trials, fine-tuned for a few dozen steps, sit further below
  it, and the export's refine, `--finetune-epochs`, wins most of that back; when none is within the margin, the
  command names the `--max-drop` that takes the nearest).
- Browse the study interactively: `optuna-dashboard sqlite:///studies/vgg16-cifar10-cpu.db`.
- Kolda & Bader (2009) for the full theory; Kim et al. (2015) for Tucker-2 on CNNs.
""")


def build() -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for index, (kind, source) in enumerate(CELLS):
        cell = new_markdown_cell(source) if kind == "markdown" else new_code_cell(source)
        cell.id = f"cell-{index:02d}"  # stable ids: regenerating gives the same file
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render() -> str:
    return nbformat.writes(build()) + "\n"


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else NOTEBOOK
    target.write_text(render())
    print(f"wrote {target}")
