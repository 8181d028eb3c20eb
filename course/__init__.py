"""Course assignments built from the method scripts: blank chosen functions, grade a student's copy.

    python course/make_assignment.py A2 --out DIR     a student copy of the last commit, A2's functions blanked
    python course/grade.py A2 DIR                      grade it: a row per function; exit 0 = full marks only

The assignments are defined in course/assignments.py, the checks in course/graders.py; the student's code runs
only in child processes (course/sandbox.py, course/child.py) and the grader alone writes the verdict. The
graders' test sets (wrong answers, right answers written another way, cheats) are in course/mutants.py;
course/README.md is the instructor's guide. Nothing in this folder is copied into a student copy.
"""
