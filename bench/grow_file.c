/* CPU time the kernel takes to write into pages new to a file against overwriting them
 * (bench/README.md, "Session seventeen"): ROUNDS x 512 kB written in 64 KiB pwrites into
 * a new file (it grows, so every page is new to the page cache), then the same bytes
 * written again over it. Process CPU time per 512 kB; no sync.
 *   cc -O2 bench/grow_file.c -o /tmp/grow_file && /tmp/grow_file [FILE [ROUNDS]]
 * FILE (default grow_file.dat, removed at the end) must be on the disk the store uses;
 * ROUNDS defaults to 3200 (1.6 GB). On a VM that hands freed memory back to its host the
 * first run after a quiet spell pays for the host's faults; run it twice in a row. */
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

static int pass(int fd, const char *buf, int rounds, int total, int piece) {
  for (int r = 0; r < rounds; r++)
    for (int o = 0; o < total; o += piece)
      if (pwrite(fd, buf + o, piece, (off_t)r * total + o) != piece) { perror("pwrite"); return 1; }
  return 0;
}

int main(int argc, char **argv) {
  const char *path = argc > 1 ? argv[1] : "grow_file.dat";
  const int rounds = argc > 2 ? atoi(argv[2]) : 3200, total = 512 * 1024, piece = 65536;
  if (rounds <= 0) { fprintf(stderr, "ROUNDS must be positive\n"); return 2; }
  char *buf = malloc(total);
  if (!buf) { perror("malloc"); return 1; }
  memset(buf, 7, total);
  int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
  if (fd < 0) { perror(path); return 1; }
  double c0 = cpu();
  int failed = pass(fd, buf, rounds, total, piece);
  double c1 = cpu();
  failed = failed || pass(fd, buf, rounds, total, piece);
  double c2 = cpu();
  close(fd);
  unlink(path);
  if (failed) return 1;
  printf("growing the file %.1f us/512kB, overwriting it %.1f us/512kB (%d x 512 kB)\n",
         (c1 - c0) / rounds * 1e6, (c2 - c1) / rounds * 1e6, rounds);
  return 0;
}
