"""Reading and presenting finished studies: the result table (table), the one study reader (study_folder),
the report (report: leaderboard, figures, render, compare, protocols), export with a model card, image
generation from a trial, and the gradio app.
"""
