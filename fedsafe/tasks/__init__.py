"""What a site trains: the public :class:`~fedsafe.tasks.task.Task` API and the tasks.

The shipped tasks (:mod:`fedsafe.tasks.heart`, :mod:`fedsafe.tasks.lending`,
:mod:`fedsafe.tasks.mnist`) and the CSV + schema task (:mod:`fedsafe.tasks.csv_task`).
"""
