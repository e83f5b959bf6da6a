"""``python -m ds_burst.plan``: the cost model's command line (:mod:`ds_burst.cli.plan`)."""

from ds_burst.cli.plan import main

if __name__ == "__main__":
    main()
