# Hack: laziness in another process: pipe the matrices to a python that has numpy.
# Stopped by: the static import check; the import guard; seccomp refuses fork/vfork/clone.
import json
import subprocess
import sys


def matmul(A, B):
    code = "import json,sys,numpy as np;a,b=json.load(sys.stdin);print(json.dumps((np.array(a)@np.array(b)).tolist()))"
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps([A, B]), capture_output=True, text=True)
    return json.loads(out.stdout)
