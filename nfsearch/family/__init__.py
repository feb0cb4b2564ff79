"""Plan families: one plan per engine bucket for a trace (`nfsearch solve --family`), its prediction
of the trace's tokens/s, and the file that carries them (torch-free)."""
