/* The additive attention's scores, forward and backward, each as one pass over the values.
 *
 *     scores[i, b, l] = sum_a weight[a] * tanh(projection[i, l, a] + query[i, b, a]) + bias
 *
 * for the k query rows b (captions or beams) of each image i, l over the regions and a over the
 * attention size. PyTorch runs this as an add, a tanh and a product, and the backward as nine
 * more passes; here every value of the tanh is made once per pass and used where it is made.
 * The images are split over `threads` OpenMP threads. captioner/models/native_attention.py builds
 * and loads this file; tests/test_native_attention.py checks it against the PyTorch ops.
 *
 * glibc's libmvec has the vector tanhf this loop needs. <math.h> only announces it under
 * -ffast-math, which would also give up NaN and infinity handling, so it is announced here. */

#include <omp.h>
#include <stdlib.h>
#include <string.h>

#pragma omp declare simd notinbranch
float tanhf(float);

typedef struct {
    const float *projection, *query, *weight, *grad_scores; /* (G, L, A), (G, k, A), (A), (G, k, L) */
    float *scores, *grad_projection, *grad_query, *grad_weight;
    long first_image, end_image, rows, regions, size; /* rows = k, regions = L, size = A */
    float bias;
} Work;

static void forward_images(const Work *work) {
    const long rows = work->rows, regions = work->regions, size = work->size;
    const float *restrict weight = work->weight;
    for (long image = work->first_image; image < work->end_image; image++) {
        const float *projection = work->projection + image * regions * size;
        const float *query = work->query + image * rows * size;
        float *scores = work->scores + image * rows * regions;
        for (long region = 0; region < regions; region++) {
            const float *restrict p = projection + region * size;
            for (long row = 0; row < rows; row++) {
                const float *restrict q = query + row * size;
                float score = 0.0f;
#pragma omp simd reduction(+ : score)
                for (long a = 0; a < size; a++) score += weight[a] * tanhf(p[a] + q[a]);
                scores[row * regions + region] = score + work->bias;
            }
        }
    }
}

/* d score / d (p + q) = weight * (1 - tanh^2): summed over the image's rows for the projection,
 * over the regions for the query; the weight's gradient is sum(grad * tanh) over everything. */
static void backward_images(const Work *work) {
    const long rows = work->rows, regions = work->regions, size = work->size;
    const float *restrict weight = work->weight;
    float *restrict grad_weight = work->grad_weight; /* this thread's own partial sum */
    for (long image = work->first_image; image < work->end_image; image++) {
        const float *projection = work->projection + image * regions * size;
        const float *query = work->query + image * rows * size;
        const float *grad_scores = work->grad_scores + image * rows * regions;
        float *grad_projection = work->grad_projection + image * regions * size;
        float *grad_query = work->grad_query + image * rows * size;
        memset(grad_query, 0, sizeof(float) * rows * size);
        for (long region = 0; region < regions; region++) {
            const float *restrict p = projection + region * size;
            float *restrict grad_p = grad_projection + region * size;
            memset(grad_p, 0, sizeof(float) * size);
            for (long row = 0; row < rows; row++) {
                const float *restrict q = query + row * size;
                float *restrict grad_q = grad_query + row * size;
                const float grad = grad_scores[row * regions + region];
#pragma omp simd
                for (long a = 0; a < size; a++) {
                    const float activation = tanhf(p[a] + q[a]);
                    const float grad_sum = grad * weight[a] * (1.0f - activation * activation);
                    grad_weight[a] += grad * activation;
                    grad_q[a] += grad_sum;
                    grad_p[a] += grad_sum;
                }
            }
        }
    }
}

/* Runs `body` over the images split into contiguous parts, one per OpenMP thread. In a PyTorch
 * process this library shares PyTorch's own libgomp (the same soname), so its threads are the ones
 * PyTorch's ops just used, not new ones competing with them for the cores. With `grad_weight`,
 * each part sums into its own zeroed vector and those are added into `grad_weight` in a fixed
 * order, so that the result depends only on the thread count. Returns 0, or -1 if memory ran out. */
static int run_parts(void (*body)(const Work *), Work shared, long images, int threads,
                     float *grad_weight) {
    if (threads > images) threads = (int)images;
    if (threads < 1) threads = 1;
    float *partial = NULL;
    if (grad_weight != NULL) {
        partial = calloc((size_t)threads * shared.size, sizeof(float));
        if (partial == NULL) return -1;
    }
    int parts = 1;
#pragma omp parallel num_threads(threads)
    {
        const int part = omp_get_thread_num();
#pragma omp single
        parts = omp_get_num_threads();
        Work work = shared;
        work.first_image = images * part / parts;
        work.end_image = images * (part + 1) / parts;
        if (partial != NULL) work.grad_weight = partial + (size_t)part * shared.size;
        body(&work);
    }
    if (partial != NULL) {
        for (int part = 0; part < parts; part++)
            for (long a = 0; a < shared.size; a++)
                grad_weight[a] += partial[(size_t)part * shared.size + a];
        free(partial);
    }
    return 0;
}

int additive_scores_forward(const float *projection, const float *query, const float *weight,
                            float *scores, long images, long rows, long regions, long size,
                            float bias, int threads) {
    Work work = {projection, query, weight, NULL, scores, NULL, NULL, NULL,
                 0, 0, rows, regions, size, bias};
    return run_parts(forward_images, work, images, threads, NULL);
}

/* grad_weight is added to (pass zeros); grad_projection and grad_query are overwritten. */
int additive_scores_backward(const float *projection, const float *query, const float *weight,
                             const float *grad_scores, float *grad_projection, float *grad_query,
                             float *grad_weight, long images, long rows, long regions, long size,
                             int threads) {
    Work work = {projection, query, weight, grad_scores, NULL, grad_projection, grad_query, NULL,
                 0, 0, rows, regions, size, 0.0f};
    return run_parts(backward_images, work, images, threads, grad_weight);
}
