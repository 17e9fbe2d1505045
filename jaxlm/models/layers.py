"""Building blocks: projections, embeddings, norms and MLPs, each parameter tagged with
logical axis names (vocab, embed, heads, kv_heads, head_dim, mlp) for sharding."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import lora
from jaxlm.models.matmul import project
from jaxlm.models.names import TOKEN_TABLE

Axes = tuple[str | None, ...]


def normal_init(std: float, axes: Axes) -> nn.initializers.Initializer:
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def zeros_init(axes: Axes) -> nn.initializers.Initializer:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def ones_init(axes: Axes) -> nn.initializers.Initializer:
    return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


@jax.custom_vjp
def materialize_grad(x: jax.Array) -> jax.Array:
    """The identity forward; backward, the incoming gradient passed through a product with an
    identity matrix. XLA fuses no elementwise chain through a matmul, so the gradient is
    written once instead of recomputed inside each of its consumers (XLA's CPU fusion
    duplicates a residual stream's layer-norm backward into every weight-gradient transpose
    that reads it)."""
    return x


def _materialize_fwd(x: jax.Array) -> tuple[jax.Array, None]:
    return x, None


# The scope of the barrier's product: FLOP counts (jaxlm.perf) leave it out of model work.
GRAD_BARRIER_SCOPE = "grad_barrier"


def _materialize_bwd(_: None, g: jax.Array) -> tuple[jax.Array]:
    with jax.named_scope(GRAD_BARRIER_SCOPE):
        eye = jnp.eye(g.shape[-1], dtype=g.dtype)
        return (jnp.einsum("...d,de->...e", g, eye),)


materialize_grad.defvjp(_materialize_fwd, _materialize_bwd)


class Projection(nn.Module):
    """x[..., in_features] @ kernel[in_features, *features] (+ bias), in the compute dtype;
    with an `adapter` (jaxlm.lora.Adapter), plus its low-rank update from `lora_a`, `lora_b`."""

    features: Sequence[int]
    kernel_axes: Axes
    in_axes: int = 1  # trailing input axes contracted (2 for heads × head_dim -> embed)
    use_bias: bool = True
    std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    adapter: lora.Adapter | None = None
    deterministic: bool = True  # the adapter's dropout is off

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[-self.in_axes:]
        kernel = self.param("kernel", normal_init(self.std, self.kernel_axes),
                            (*in_shape, *self.features), self.param_dtype)
        y = project(x.astype(self.dtype), kernel.astype(self.dtype), self.in_axes)
        if self.use_bias:
            bias_axes = self.kernel_axes[self.in_axes:]
            bias = self.param("bias", zeros_init(bias_axes), tuple(self.features),
                              self.param_dtype)
            y = y + bias.astype(self.dtype)
        ad = self.adapter
        if ad is not None:
            a_axes, b_axes = lora.adapter_axes(tuple(self.kernel_axes), self.in_axes)
            a = self.param(lora.A, lora.a_init(a_axes, self.in_axes), (*in_shape, ad.rank),
                           self.param_dtype)
            b = self.param(lora.B, zeros_init(b_axes), (ad.rank, *self.features),
                           self.param_dtype)
            x = nn.Dropout(ad.dropout)(x, deterministic=self.deterministic)
            y = y + lora.adapter_delta(x.astype(self.dtype), a.astype(self.dtype),
                                       b.astype(self.dtype), ad.scale, self.in_axes)
        return y


class Embed(nn.Module):
    """Token embedding table [vocab, embed]; `attend` is the tied output projection."""

    num_embeddings: int
    features: int
    std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    axes: Axes = ("vocab", "embed")

    def setup(self) -> None:
        self.embedding = self.param(TOKEN_TABLE, normal_init(self.std, self.axes),
                                    (self.num_embeddings, self.features), self.param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        # Logits in float32 whatever the compute dtype: bfloat16 would round them to ~3
        # significant digits before the softmax of the loss.
        return project(x_BTD.astype(self.dtype), self.embedding.astype(self.dtype).T,
                       out_dtype=jnp.float32)


class Norm(nn.Module):
    """Over the last axis, in float32: LayerNorm; RMSNorm (no mean subtraction, no bias);
    rmsnorm_plus1, RMSNorm scaled by (1 + w) with w starting at 0 (Gemma). `axis` is the
    logical name of that axis (head_dim for per-head q/k norms)."""

    kind: str = "layernorm"
    eps: float = 1e-5
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    axis: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        D = x.shape[-1]
        plus1 = self.kind == "rmsnorm_plus1"
        init = (zeros_init if plus1 else ones_init)((self.axis,))
        scale = self.param("scale", init, (D,), self.param_dtype).astype(jnp.float32)
        if self.kind in ("rmsnorm", "rmsnorm_plus1"):
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
            return (y * (1 + scale if plus1 else scale)).astype(self.dtype)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale
        if self.use_bias:
            y = y + self.param("bias", zeros_init((self.axis,)), (D,),
                               self.param_dtype).astype(jnp.float32)
        return y.astype(self.dtype)


ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


class Mlp(nn.Module):
    """wo(act(wi x)) or, gated, wo(act(wi_gate x) * wi_up x) (SwiGLU with silu)."""

    d_ff: int
    activation: str = "gelu_tanh"
    gated: bool = False
    use_bias: bool = True
    std: float = 0.02
    out_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    adapter_in: lora.Adapter | None = None  # on wi (or wi_gate and wi_up)
    adapter_out: lora.Adapter | None = None  # on wo
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        D = x_BTD.shape[-1]
        kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                  deterministic=self.deterministic)
        act = ACTIVATIONS[self.activation]
        wi = dict(std=self.std, adapter=self.adapter_in, **kw)
        if self.gated:
            gate = Projection((self.d_ff,), ("embed", "mlp"), name="wi_gate", **wi)
            up = Projection((self.d_ff,), ("embed", "mlp"), name="wi_up", **wi)
            h_BTF = act(gate(x_BTD)) * up(x_BTD)
        else:
            h_BTF = act(Projection((self.d_ff,), ("embed", "mlp"), name="wi", **wi)(x_BTD))
        h_BTF = nn.with_logical_constraint(h_BTF, ("batch", "length", "act_mlp"))
        return Projection((D,), ("mlp", "embed"), std=self.out_std, name="wo",
                          adapter=self.adapter_out, **kw)(h_BTF)
