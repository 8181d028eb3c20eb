"""Course assignments built from the method scripts: blank chosen functions, grade a student's copy.

    python course/make_assignment.py A2 --out DIR     a student copy of the project with A2's functions blanked
    python course/grade.py A2 DIR                      grade it: one row per function, points, exit 0 = full marks

The assignments are defined in course/assignments.py, the checks in course/graders.py, the plausible wrong
answers every grader must reject in course/mutants.py; course/README.md is the instructor's guide. Nothing in
this folder is copied into a student copy.
"""
