"""Teacher contexts: what the teacher reads besides the student's response.

* ``static``: the row's own teacher prompt (``data_source`` renders it, ``custom_convert`` encodes it);
* built after rewards, from the rollout group (``groups``): SDPO's reprompt (``sdpo``, pure rules) or a user-defined
  builder (``--self-distill-teacher-context-path``).

Every context ends in the same ``TeacherView`` (teacher prompt ids + the student's exact response ids).
"""
