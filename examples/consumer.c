/* A minimal C consumer of the installed moekit package: it includes only <moekit/moekit.h>,
 * links only libmoekit, and checks one RMSNorm and one top-k routing call by hand.
 * Built by tests/examples (find_package(moekit) and pkg-config); prints OK on success. */
#include <moekit/moekit.h>
#include <stdio.h>
#include <string.h>

static int failures = 0;

#define CHECK(cond)                                                  \
  do {                                                               \
    if (!(cond)) {                                                   \
      fprintf(stderr, "consumer: %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                    \
    }                                                                \
  } while (0)

static moekit_tensor tensor2d(void* data, moekit_dtype dtype, int64_t rows, int64_t cols) {
  moekit_tensor t;
  memset(&t, 0, sizeof t);
  t.data = data;
  t.dtype = dtype;
  t.ndim = 2;
  t.shape[0] = rows;
  t.shape[1] = cols;
  return t;
}

static moekit_tensor tensor1d(void* data, moekit_dtype dtype, int64_t n) {
  moekit_tensor t;
  memset(&t, 0, sizeof t);
  t.data = data;
  t.dtype = dtype;
  t.ndim = 1;
  t.shape[0] = n;
  return t;
}

static float absf(float v) { return v < 0 ? -v : v; }

int main(void) {
  char expected_version[32];
  snprintf(expected_version, sizeof expected_version, "%d.%d.%d", MOEKIT_VERSION_MAJOR,
           MOEKIT_VERSION_MINOR, MOEKIT_VERSION_PATCH);
  CHECK(strcmp(moekit_version(), expected_version) == 0);

  /* RMSNorm of [2, -2, 2, -2]: mean square 4, rms 2; times w = [1, 2, 0.5, -1]. */
  float x[4] = {2, -2, 2, -2}, w[4] = {1, 2, 0.5f, -1}, y[4] = {0, 0, 0, 0};
  moekit_tensor tx = tensor2d(x, MOEKIT_F32, 1, 4);
  moekit_tensor tw = tensor1d(w, MOEKIT_F32, 4);
  moekit_tensor ty = tensor2d(y, MOEKIT_F32, 1, 4);
  moekit_status s = moekit_rmsnorm(&tx, &tw, 0.0f, &ty);
  if (s != MOEKIT_OK) fprintf(stderr, "consumer: moekit_rmsnorm: %s\n", moekit_last_error());
  CHECK(s == MOEKIT_OK);
  CHECK(y[0] == 1.0f && y[1] == -2.0f && y[2] == 0.5f && y[3] == 1.0f);

  /* Sigmoid top-2 of [0, 2, -1, 1]: experts 1 and 3, weight sigmoid(2) = 0.880797. */
  float logits[4] = {0, 2, -1, 1}, weights[2] = {0, 0};
  int32_t ids[2] = {-1, -1};
  moekit_route_params p = moekit_route_params_default();
  p.top_k = 2;
  p.scoring = MOEKIT_SCORING_SIGMOID;
  moekit_tensor tl = tensor2d(logits, MOEKIT_F32, 1, 4);
  moekit_tensor tweights = tensor2d(weights, MOEKIT_F32, 1, 2);
  moekit_tensor tids = tensor2d(ids, MOEKIT_I32, 1, 2);
  s = moekit_topk_route(&tl, NULL, &p, &tweights, &tids);
  if (s != MOEKIT_OK) fprintf(stderr, "consumer: moekit_topk_route: %s\n", moekit_last_error());
  CHECK(s == MOEKIT_OK);
  CHECK(ids[0] == 1 && ids[1] == 3);
  CHECK(absf(weights[0] - 0.880797f) < 1e-5f && absf(weights[1] - 0.731059f) < 1e-5f);

  /* A bad call reports an error. */
  p.top_k = 9;
  CHECK(moekit_topk_route(&tl, NULL, &p, &tweights, &tids) == MOEKIT_ERR_INVALID_ARGUMENT);
  CHECK(strstr(moekit_last_error(), "moekit_topk_route") != NULL);

  if (failures) return 1;
  printf("OK moekit %s (%s)\n", moekit_version(), moekit_isa_name(moekit_effective_isa()));
  return 0;
}
