"""Work-arounds for JAX/Flax behaviour that costs time but changes no result."""

from __future__ import annotations

import contextlib

__all__ = ["quiet_tracer_origins"]


@contextlib.contextmanager
def quiet_tracer_origins():
    """Skip building the "where did this tracer come from" text of tracer errors.

    Flax's ``Variable.__setitem__`` (every ``rngs.params()`` draw bumps a counter through
    it) probes ``getattr(value, "sharding", None)``. On a tracer JAX answers with an
    AttributeError whose message walks the whole jaxpr traced so far, and getattr then
    throws that message away. Building a model under ``nnx.jit``/``nnx.eval_shape`` with
    ~1,500 draws is therefore quadratic: 67 s for MFuser-L on a 2-core CPU, 1.7 s without
    the walk. Inside this context the message omits the origin paragraph; nothing else
    changes. A JAX without the private hook is left alone.
    """
    try:
        from jax._src.interpreters import partial_eval as pe

        tracer = pe.DynamicJaxprTracer
        original = tracer.__dict__["_origin_msg"]
    except (ImportError, AttributeError, KeyError):
        yield
        return
    tracer._origin_msg = lambda self: ""
    try:
        yield
    finally:
        tracer._origin_msg = original
