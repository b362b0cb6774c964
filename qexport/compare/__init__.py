"""``qexport compare``: the method x width x target grid through the real pipeline (grid.py runs and resumes it,
cell.py runs one cell, report.py and plots.py write compare.md, compare.json and the PNG plots). It sits at the
top beside the CLI: it drives calibrate, export, build-engine and verify."""
