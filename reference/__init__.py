"""moe-compat reference: a pure-PyTorch, float64-capable executable spec of MoE expert math.

Imports only torch. Each module holds one concern (see docs/ARCHITECTURE.md); each public function states its
shapes and formula in its docstring.
"""
