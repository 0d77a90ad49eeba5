"""What a study is on disk and in Optuna, shared by the sweep that writes it and the results that read it:
the Optuna storage (store), grid planning (plan) and the typed trial record (record).
"""
