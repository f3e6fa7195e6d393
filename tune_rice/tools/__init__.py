"""The tools that read a finished search's files: predict, evaluate, explain, report, export."""
