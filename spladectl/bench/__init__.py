"""`spladectl bench`: real training steps in each precision on this machine, timed, measured and compared.

For every precision asked for, a fresh `engine.Trainer` (model, optimizer, GradScaler, autocast exactly as
`spladectl train` builds them) runs W warm-up steps and N timed optimizer steps on the same examples. A row reports:

- the median step time and examples/s (batch / median step), and the speed-up over 32-true;
- peak memory during the steps: process RSS on CPU (sampled every 5 ms by spladectl.memory.StepSampler), the CUDA
  caching allocator's `max_memory_allocated` on CUDA, allocated memory on MPS;
- the model FLOPs of one optimizer step, counted by `torch.utils.flop_counter.FlopCounterMode` on one extra step
  (exact for the ops it knows: every matmul of the encoder, the vocabulary projection, the attention and the
  backward; element-wise ops count as 0). If the counter cannot run, `estimate_step_flops` gives the textbook
  formula instead, and `flops_source` says which;
- achieved FLOP/s (step FLOPs / median step time) and its share of this device's own matmul FLOP/s in that precision,
  measured by timing a large square matmul of operands already in the compute dtype, under the same autocast.

`find_max_batch` searches the largest batch whose step fits a memory budget: from the bench batch it doubles while
the step fits (or halves until it does), then bisects; every probe is two real optimizer steps of a fresh Trainer
(the second step is the heavier one: the optimizer's state exists by then). A probe fails when its peak exceeds the
budget, when the step raises out-of-memory, or when the engine's OOM recovery had to split the micro-batch. A probe
whose memory, extrapolated linearly from the probes before it, would exceed the budget by more than 25% is not run
(on a CPU, really running out of memory ends in the kernel's OOM killer, not an exception).

The default examples are the demo's queries with documents filled to `max_doc_length` tokens from the demo passages,
so each document costs what a SciFact abstract does (most exceed 256 tokens); `data=` benchmarks real data instead.
"""
