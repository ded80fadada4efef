"""The generation benchmark: this project's engine raced against PyTorch on the same weights.

run.py              the grid of cells, the agreement check, timings, results
implementations.py  the generators raced, behind one interface
nocache.py          nanoGPT's algorithm (no KV cache) on this project's model
hardware.py         the hardware floor of a decode step, measured in the same run
profile.py          where a step's time goes, from a profiler's trace
report.py           results.json, results.csv, the plot and the stdout table
"""
