"""Test support shared by tests/ (and bench/): tiny random models of every MoE family (`zoo`), a seeded LoRA SFT
loop on a synthetic task (`train`), greedy generation and distribution helpers (`generate`).

They build the checks' inputs; nothing in `impl/` uses them. They live with the checks that the harness runs in every
matrix cell, so a new check (or a subject adapter's own test) imports them from here."""
