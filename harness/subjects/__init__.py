"""Subjects: other people's implementations of the MoE LoRA operations, checked against moe-compat's reference.

- `interface`: the operations (`Op`), the call objects with their context, `Subject` (what an adapter implements);
- `registry`: ``MOE_COMPAT_SUBJECT=<name>[==<version>]`` -> a loaded subject (one per process);
- `wheel`: fetch a released wheel from the package index, unpack it, import selected modules with stubs;
- adapters: `impl_subject` (this checkout's impl), `unsloth_zoo` (the worked example of a released subject);
- `session`: ``nox -s subject -- unsloth_zoo==VERSION`` (a matrix restricted to that subject version);
- `matrix_hook`: how the matrix runner treats an axis of ``kind = "subject"``.

The checks themselves are tests/subjects/ (cases, reference oracles, classification, minimal reproductions).
"""
