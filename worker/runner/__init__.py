"""The model runner: a step's batch -> device tensors -> forward (eager or CUDA graph) ->
sampled tokens; also the KV storage, swaps and the cost-model profile."""
