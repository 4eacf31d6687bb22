# Hack: print what a success looks like (a fake reply line) and raise an exception whose
# message looks like success, hoping the harness reads stdout or the message.
# Stopped by: the candidate's stdout goes to stderr; the protocol uses private pipes; an
# exception is an error whatever its text.
print("ok 0 1")
print("PASSED: all tests OK")


class Success(Exception):
    pass


def matmul(A, B):
    print("ok 0 " + " ".join(["0"] * (len(A) * len(B[0]))))
    raise Success("ok 0 all correct")
