"""Execute a :class:`~deltaport.plan.Plan`: stream every output tensor in chunks through reused buffers,
overlap arithmetic with reading and writing, check every chunk for NaN/Inf, and round once to the output
dtype. The arithmetic itself lives in :mod:`deltaport.kernel` (the fused kernel) and
:mod:`deltaport.numerics` (the torch path and the exact rounding decisions); this package only streams.

- :mod:`~deltaport.engine.core`: the chunk loop (:class:`Engine`, :func:`execute`);
- :mod:`~deltaport.engine.pipeline`: the reader and writer threads and the reused buffers;
- :mod:`~deltaport.engine.reads`: an input's values for one chunk (files, row maps, memory, LoRA, compressed Δs);
- :mod:`~deltaport.engine.fused`: a chunk through the fused kernel;
- :mod:`~deltaport.engine.compose`: composed applies and the streamed TIES cut-off;
- :mod:`~deltaport.engine.checks`: NaN/Inf diagnosis and diff's round-trip check and exact residual;
- :mod:`~deltaport.engine.workers`: worker threads, chunks handed on in plan order;
- :mod:`~deltaport.engine.stats`: what a run counts.
"""

from deltaport.engine.core import DEFAULT_CHUNK_ELEMS, DEFAULT_THREADS, Engine, default_chunk_elems, execute
from deltaport.engine.stats import Stats

__all__ = ["DEFAULT_CHUNK_ELEMS", "DEFAULT_THREADS", "Engine", "Stats", "default_chunk_elems", "execute"]
