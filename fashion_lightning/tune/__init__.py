"""``python -m fashion_lightning.tune``: a hyperparameter search over ``fit`` runs, on Optuna.

    python -m fashion_lightning.tune --config configs/best.yaml \\
        --search configs/search/mlp.yaml --trials 40

Each trial is a real ``fit`` of the project's CLI with the sampled values as overrides, in its
own run folder ``lightning_logs/tune/<study>/trial_N/`` (so TensorBoard's HParams tab compares
the trials, and each trial's ``config.yaml`` reproduces it). The objective is the best
``val/acc`` (or, with ``--objective val/loss``, the lowest ``val/loss``), whatever the
checkpoint monitors; the official test split is read only by ``--confirm_seeds``. Trials that
fall behind are pruned (Optuna's MedianPruner through optuna-integration's Lightning
callback). The study lives in a journal file next to the trials, or in any Optuna storage URL
(PostgreSQL for several machines, with heartbeats); running the same command again continues
it. A stop (Ctrl+C, SIGTERM, a killed worker, a dead machine) queues the parameters of the
trials it cut short again.

- :mod:`.command`: the command line, and how it ends (exit codes, one-line errors);
- :mod:`.space`: the search file, checked against ``fit`` before any trial;
- :mod:`.storage`: where the study lives, a torn journal mended, a dead worker's trial told,
  and a storage URL printed without its password;
- :mod:`.study`: opening the study, and checking it is the one this command continues;
- :mod:`.search`: the trials this process runs, and waiting for the others';
- :mod:`.workers`: worker processes, and the signals that stop the search;
- :mod:`.report`: the summary table, plots, ``best.yaml`` and the confirmation runs.
"""

from fashion_lightning.tune.command import main

__all__ = ["main"]
