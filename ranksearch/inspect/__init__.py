"""What a user reads of a study, while it runs and after: the progress lines and ETA (``progress``), the notes
optuna-dashboard shows on the study's and each trial's page (``notes``), the report and its Pareto plot
(``report``), and the dashboard server (``dashboard``). It reads the study; it runs no trial."""
