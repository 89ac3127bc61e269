"""`visual-rft report`: static HTML pages of runs, evals, demos and sweeps, built from their files.

Imports run one way, each layer from the layers above it only (tests/test_report_layers.py checks it):

    read.py, discover.py   what is on disk: streamed metrics/rollouts/predictions; which folder is what
    plots.py, images.py    figures: matplotlib curves and bars; records' images with boxes drawn
    html.py                HTML building blocks (every string escaped here)
    sweep.py               a data-efficiency sweep's table, plot and section
    build.py               the page: sections of each run, `write_report`, `report_command` (the CLI's)

A report reads files; it never trains, so nothing here imports visual_rft.rl.
"""
