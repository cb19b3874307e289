"""One cell from the command line, the same as `marker-lab run`:

    python -m marker_lab.run                        # the default toy cell
    python -m marker_lab.run condition=c4 seed=137  # any Hydra override

The recipe itself is marker_lab/cell/recipe.py (plan, train, sample, write).
"""

from marker_lab.cell.main import main

if __name__ == "__main__":
    main()
