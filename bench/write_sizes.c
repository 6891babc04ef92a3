/* CPU time the kernel takes to write and read 512 kB in pieces of 4 KiB, 64 KiB and
 * 512 kB (bench/README.md, "Gathered WAL writes"). 400 rounds over a 20 MB region of
 * one file written once beforehand, as a WAL is reused; page cache only (no sync).
 *   cc -O2 bench/write_sizes.c -o /tmp/write_sizes && /tmp/write_sizes [FILE]      */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double cpu(void) {
  struct timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
  const char *path = argc > 1 ? argv[1] : "write_sizes.dat";
  const int total = 512 * 1024, rounds = 400, pieces[] = {4096, 65536, 524288};
  int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
  if (fd < 0) { perror(path); return 1; }
  char *buf = malloc(total);
  memset(buf, 7, total);
  /* The region exists before anything is timed: every pass overwrites pages. */
  for (int r = 0; r < 40; r++)
    if (pwrite(fd, buf, total, (off_t)r * total) != total) { perror("pwrite"); return 1; }
  printf("piece bytes   write us/512kB   read us/512kB\n");
  for (int p = 0; p < 3; p++) {
    int n = pieces[p];
    double t0 = cpu();
    for (int r = 0; r < rounds; r++) {
      off_t base = (off_t)(r % 40) * total;
      for (int o = 0; o < total; o += n)
        if (pwrite(fd, buf + o, n, base + o) != n) { perror("pwrite"); return 1; }
    }
    double t1 = cpu();
    for (int r = 0; r < rounds; r++) {
      off_t base = (off_t)(r % 40) * total;
      for (int o = 0; o < total; o += n)
        if (pread(fd, buf + o, n, base + o) != n) { perror("pread"); return 1; }
    }
    double t2 = cpu();
    printf("%11d %16.1f %15.1f\n", n, (t1 - t0) / rounds * 1e6, (t2 - t1) / rounds * 1e6);
  }
  close(fd);
  unlink(path);
  return 0;
}
