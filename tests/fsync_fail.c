/* A shared library for LD_PRELOAD that makes every fsync fail with EIO, as a disk
   that reports a write error would. tests/run.sh saves a model folder over an
   existing one with it loaded and checks that the save reports the error and leaves
   the old files as they were. */
#include <errno.h>

int fsync(int fd);

int fsync(int fd)
{
    (void)fd;
    errno = EIO;
    return -1;
}
