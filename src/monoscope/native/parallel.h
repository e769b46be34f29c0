/* How the kernels split their rows across threads.
 *
 * Built with OpenMP (-fopenmp, when the compiler has it), a kernel's row loop runs on the process's OpenMP runtime:
 * libgomp.so.1, which torch has already loaded, so the kernel's threads are torch's own intra-op threads, still
 * awake from the aten op before. Threads of another pool would compete with those spinning threads for the cores:
 * measured on a 2-core machine, a 6 ms kernel took 10 ms right after a matmul when split across a Python thread
 * pool. Without OpenMP the pragmas are ignored, each call runs on one thread, and the caller splits the rows
 * across its own pool (monoscope.native._in_parts). */
#ifndef MONOSCOPE_PARALLEL_H
#define MONOSCOPE_PARALLEL_H

/* the number of threads of the next call's row loop, set by the caller (torch's thread count, fewer for few rows) */
static int n_threads = 1;

void set_threads(int n) { n_threads = n > 0 ? n : 1; }

int built_with_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

#endif
