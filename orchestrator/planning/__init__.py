"""Pure translations of a job spec into what a run needs: optimizer steps, the DeepSpeed config, Ray
resources, PEFT targets and the memory plan. No I/O beyond reading a model's config; imports no torch, Ray or peft."""
