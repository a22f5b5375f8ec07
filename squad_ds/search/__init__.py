"""`squad-ds search`: hyper-parameter search for accuracy with Optuna, each trial a real `squad-ds train` run."""
