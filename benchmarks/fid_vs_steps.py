"""FID (W2 on 2D data) against the number of sampling steps — same as ``flowmap report``.

    python benchmarks/fid_vs_steps.py --teacher T.ckpt --flowmap L.ckpt [--flowmap name=E.ckpt …]
        --out DIR [--nfe 1 2 4 8 16 32] [--solvers euler heun] [--n-samples N] [--save-samples]

See ``flowmap/apps/report/__init__.py`` for the protocol and the files it writes.
"""

from flowmap.apps.report import main

if __name__ == "__main__":
    main()
