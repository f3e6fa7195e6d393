"""What a search leaves on disk and how to read it: the folder and its arguments, the search space, the Optuna study."""
