/*
 * Crop-first JPEG decoding for RandomResizedCrop, on libjpeg-turbo's libjpeg API.
 *
 * The stock pipeline decodes the whole image and then crops. Here the crop box is known first
 * (it depends only on the image's height and width), and only what the box needs is decoded:
 *
 *   1. splice  - when the JPEG has restart markers whose interval divides an MCU row, the entropy-
 *                coded segments that cover the box are copied, with renumbered RST markers, into a
 *                smaller baseline JPEG (new SOF height/width). Restart markers reset the DC
 *                predictors, so the small stream decodes to the same coefficients without any
 *                re-encoding, and Huffman decoding scales with the box's area, not the image's.
 *   2. scale   - the smallest IDCT scale M/8 whose output still covers the output size
 *                (libjpeg's scale_num/scale_denom; only downscaling, so the resize that follows
 *                never upsamples more than the full decode would).
 *   3. region  - jpeg_crop_scanline() for columns, jpeg_skip_scanlines() for the rows above the box,
 *                and jpeg_abort_decompress() after its last row.
 *
 * Each lever can be switched off by a flag, so that the benchmark can measure it alone. The
 * caller (numba, through ctypes) then resizes the reported sub-rectangle of `dst` to the output.
 *
 * Built as a Python extension module only so that pip compiles it at install; it is loaded with
 * ctypes (like ffcv's own _libffcv) and has no Python-level functions.
 */
#include <Python.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>
#include <jpeglib.h>

#define JC_SPLICE 1u
#define JC_SCALE 2u
#define JC_REGION 4u
#define JC_SCALE_POW2_ONLY 8u /* restrict the IDCT scale to 1/8, 2/8, 4/8, 8/8 */

/* Error codes (negative) returned to the caller. */
#define JC_E_DECODE -1   /* libjpeg reported an error */
#define JC_E_SPACE -2    /* dst too small */
#define JC_E_ARGS -3     /* box outside the image */

struct jc_error {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
};

static void jc_error_exit(j_common_ptr cinfo) {
    struct jc_error *err = (struct jc_error *)cinfo->err;
    longjmp(err->jump, 1);
}

static void jc_silent(j_common_ptr cinfo) { (void)cinfo; }
static void jc_silent_level(j_common_ptr cinfo, int level) { (void)cinfo; (void)level; }

/* ------------------------------------------------------------------ marker parsing for splice */

struct jc_layout {
    uint32_t height, width;
    uint32_t mcu_w, mcu_h;
    uint32_t restart;         /* MCUs per restart interval, 0 = none */
    uint64_t sof_dims;        /* offset of SOF's height field (2 bytes height, 2 bytes width) */
    uint64_t data_start;      /* first byte of entropy-coded data (after the SOS header) */
};

static uint32_t be16(const uint8_t *p) { return ((uint32_t)p[0] << 8) | p[1]; }

/* Parse up to the first scan. Returns 1 for a single-scan baseline/extended Huffman JPEG whose
 * layout allows splicing, 0 otherwise (progressive, arithmetic, no restart markers, odd scan). */
static int jc_parse(const uint8_t *src, uint64_t len, struct jc_layout *lay) {
    uint64_t pos = 2;
    int have_sof = 0;
    uint32_t hmax = 1, vmax = 1, ncomp = 0;
    memset(lay, 0, sizeof(*lay));
    if (len < 4 || src[0] != 0xFF || src[1] != 0xD8) return 0;
    while (pos + 4 <= len) {
        if (src[pos] != 0xFF) return 0;
        uint8_t m = src[pos + 1];
        if (m == 0xFF) { pos++; continue; }            /* fill byte */
        if (m == 0xD8 || (m >= 0xD0 && m <= 0xD7)) return 0;
        uint32_t seglen = be16(src + pos + 2);
        if (seglen < 2 || pos + 2 + seglen > len) return 0;
        const uint8_t *seg = src + pos + 4;
        if (m == 0xC0 || m == 0xC1) {                   /* baseline / extended sequential Huffman */
            if (seglen < 8 || seg[0] != 8) return 0;
            lay->sof_dims = pos + 5;
            lay->height = be16(seg + 1);
            lay->width = be16(seg + 3);
            ncomp = seg[5];
            if (ncomp == 0 || seglen < 8 + 3 * ncomp) return 0;
            for (uint32_t c = 0; c < ncomp; c++) {
                uint32_t hs = seg[6 + 3 * c + 1] >> 4, vs = seg[6 + 3 * c + 1] & 15;
                if (hs > hmax) hmax = hs;
                if (vs > vmax) vmax = vs;
            }
            have_sof = 1;
        } else if ((m >= 0xC2 && m <= 0xC3) || (m >= 0xC5 && m <= 0xCF && m != 0xC8 && m != 0xCC)) {
            return 0;                                   /* progressive, lossless, arithmetic ... */
        } else if (m == 0xDD) {
            if (seglen != 4) return 0;
            lay->restart = be16(seg);
        } else if (m == 0xDA) {
            if (!have_sof || seglen < 3) return 0;
            uint32_t ns = seg[0];
            if (ns != ncomp) return 0;                  /* must be one interleaved (or 1-comp) scan */
            lay->data_start = pos + 2 + seglen;
            if (ncomp == 1) { lay->mcu_w = 8; lay->mcu_h = 8; }
            else { lay->mcu_w = 8 * hmax; lay->mcu_h = 8 * vmax; }
            return lay->restart > 0 && lay->height > 0 && lay->width > 0;
        }
        pos += 2 + seglen;
    }
    return 0;
}

/* Build, at out (capacity cap), a baseline JPEG holding MCU rows [r0, r1] and restart segments
 * [c0, c1] of each row. seg_per_row = MCU columns / restart interval. Returns the stream length,
 * or 0 when the data does not look like the layout promised (the caller then decodes the original).
 * *new_h, *new_w receive the spliced image's size. */
static uint64_t jc_splice(const uint8_t *src, uint64_t len, const struct jc_layout *lay,
                          uint32_t r0, uint32_t r1, uint32_t c0, uint32_t c1, uint32_t seg_per_row,
                          uint8_t *out, uint64_t cap, uint32_t *new_h, uint32_t *new_w) {
    uint64_t header = lay->data_start;
    uint64_t pos = lay->data_start, o;
    uint32_t seg = 0;                              /* index of the segment starting at pos */
    uint32_t first = r0 * seg_per_row + c0, last = r1 * seg_per_row + c1;
    uint32_t written = 0;
    if (header + 2 > cap) return 0;
    memcpy(out, src, header);
    o = header;
    while (seg <= last) {
        /* find the end of segment `seg`: the next RSTn marker (0xFF 0xD0..D7); 0xFF00 is stuffing */
        uint64_t end = pos;
        uint64_t next = 0;
        for (;;) {
            const uint8_t *ff = memchr(src + end, 0xFF, len - end);
            if (ff == NULL) return 0;
            end = (uint64_t)(ff - src);
            if (end + 1 >= len) return 0;
            uint8_t m = src[end + 1];
            if (m == 0x00 || m == 0xFF) { end += 1 + (m == 0x00); continue; }
            if (m >= 0xD0 && m <= 0xD7) { next = end + 2; break; }
            if (m == 0xD9) { next = len; break; }   /* EOI: last segment of the image */
            return 0;                                /* another marker inside the scan: give up */
        }
        uint32_t row = seg / seg_per_row, col = seg % seg_per_row;
        if (seg >= first && row >= r0 && row <= r1 && col >= c0 && col <= c1) {
            uint64_t n = end - pos;
            if (o + n + 4 > cap) return 0;
            if (written > 0) {
                out[o++] = 0xFF;
                out[o++] = (uint8_t)(0xD0 + ((written - 1) & 7));
            }
            memcpy(out + o, src + pos, n);
            o += n;
            written++;
        }
        if (next >= len && seg < last) return 0;   /* image ended before the box did */
        pos = next;
        seg++;
    }
    out[o++] = 0xFF;
    out[o++] = 0xD9;
    {
        uint32_t band_w = seg_per_row == 0 ? 0 : lay->restart * lay->mcu_w;
        uint32_t x0 = c0 * band_w, y0 = r0 * lay->mcu_h;
        uint32_t w = (c1 - c0 + 1) * band_w, h = (r1 - r0 + 1) * lay->mcu_h;
        if (x0 + w > lay->width) w = lay->width - x0;
        if (y0 + h > lay->height) h = lay->height - y0;
        *new_h = h;
        *new_w = w;
        out[lay->sof_dims] = (uint8_t)(h >> 8);
        out[lay->sof_dims + 1] = (uint8_t)(h & 255);
        out[lay->sof_dims + 2] = (uint8_t)(w >> 8);
        out[lay->sof_dims + 3] = (uint8_t)(w & 255);
    }
    return o;
}

/* ------------------------------------------------------------------ region decode */

static uint32_t jc_pick_scale(uint32_t crop_h, uint32_t crop_w, uint32_t out_h, uint32_t out_w,
                              uint32_t flags) {
    /* margin (flags bits 8..15, in eighths; 0 = 8): the scaled box must be at least margin/8
     * times the output size in both directions, so the final resize still low-passes */
    uint64_t margin = (flags >> 8) & 255u;
    if (margin == 0) margin = 8;
    if (!(flags & JC_SCALE)) return 8;
    for (uint32_t m = 1; m < 8; m++) {
        if ((flags & JC_SCALE_POW2_ONLY) && (m & (m - 1))) continue;
        if ((uint64_t)crop_h * m * 8 >= (uint64_t)out_h * 8 * margin &&
            (uint64_t)crop_w * m * 8 >= (uint64_t)out_w * 8 * margin)
            return m;
    }
    return 8;
}

/* Decode box (y, x, h, w) of the JPEG in src at scale m/8, into dst as rows of `*stride` RGB pixels.
 * region[0..3] receive the box in dst's coordinates: top, left, bottom, right (exclusive); see
 * jc_decode_crop for the rest. strict: a libjpeg warning (corrupt data) is an error, used for
 * spliced streams so that any splice fault falls back to the original stream. */
static int jc_decode_box(const uint8_t *src, uint64_t len, uint32_t y, uint32_t x, uint32_t h,
                         uint32_t w, uint32_t m, uint32_t flags, uint8_t *dst, uint64_t cap,
                         int32_t *region, int strict) {
    struct jpeg_decompress_struct cinfo;
    struct jc_error jerr;
    int status = 0;
    cinfo.err = jpeg_std_error(&jerr.pub);
    jerr.pub.error_exit = jc_error_exit;
    jerr.pub.output_message = jc_silent;
    jerr.pub.emit_message = jc_silent_level;
    if (setjmp(jerr.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return JC_E_DECODE;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, src, (unsigned long)len);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.out_color_space = JCS_RGB;
    cinfo.dct_method = JDCT_IFAST;   /* what ffcv 1.0.2 asks TurboJPEG for (TJFLAG_FASTDCT) */
    cinfo.scale_num = m;
    cinfo.scale_denom = 8;
    jpeg_start_decompress(&cinfo);
    {
        uint32_t ow = cinfo.output_width, oh = cinfo.output_height;
        /* the box in output coordinates: at scale m/8 each 8-pixel block becomes m pixels; rounded
         * to the nearest pixel, so an edge moves by at most 4/m source pixels (none at m = 8) */
        uint32_t sy0 = (uint32_t)(((uint64_t)y * m + 4) / 8);
        uint32_t sx0 = (uint32_t)(((uint64_t)x * m + 4) / 8);
        uint32_t sy1 = (uint32_t)(((uint64_t)(y + h) * m + 4) / 8);
        uint32_t sx1 = (uint32_t)(((uint64_t)(x + w) * m + 4) / 8);
        JDIMENSION xoff = 0, cw = ow;
        if (oh == 0 || ow == 0) longjmp(jerr.jump, 1);
        if (sy0 > oh - 1) sy0 = oh - 1;
        if (sx0 > ow - 1) sx0 = ow - 1;
        if (sy1 > oh) sy1 = oh;
        if (sx1 > ow) sx1 = ow;
        if (sy1 <= sy0) sy1 = sy0 + 1;
        if (sx1 <= sx0) sx1 = sx0 + 1;
        if ((flags & JC_REGION) && (sx0 > 0 || sx1 < ow)) {
            /* two extra columns each side: smooth chroma upsampling treats the cropped columns'
             * edges as image edges, which would change the box's outer pixels */
            uint32_t c0 = sx0 > 2 ? sx0 - 2 : 0, c1 = sx1 + 2 < ow ? sx1 + 2 : ow;
            xoff = c0;
            cw = c1 - c0;
            jpeg_crop_scanline(&cinfo, &xoff, &cw);   /* widened to iMCU boundaries */
        }
        uint32_t first_row = (flags & JC_REGION) ? sy0 : 0;
        uint32_t last_row = (flags & JC_REGION) ? sy1 : oh;   /* exclusive */
        uint64_t stride = (uint64_t)cw * 3;
        if ((uint64_t)(last_row - first_row) * stride > cap) {
            status = JC_E_SPACE;
        } else {
            if (first_row > 0) {
                JDIMENSION skipped = jpeg_skip_scanlines(&cinfo, first_row);
                if (skipped != first_row) first_row = skipped;  /* defensive; libjpeg skips all */
            }
            while (cinfo.output_scanline < last_row) {
                JSAMPROW row = dst + (uint64_t)(cinfo.output_scanline - first_row) * stride;
                if (jpeg_read_scanlines(&cinfo, &row, 1) != 1) {   /* no progress: give up */
                    status = JC_E_DECODE;
                    break;
                }
            }
            if (strict && jerr.pub.num_warnings > 0) status = JC_E_DECODE;
            region[0] = (int32_t)(sy0 - first_row);
            region[1] = (int32_t)(sx0 - xoff);
            region[2] = (int32_t)(sy1 - first_row);
            region[3] = (int32_t)(sx1 - xoff);
            region[4] = (int32_t)(last_row - first_row);   /* rows in dst */
            region[5] = (int32_t)cw;                        /* columns in dst (row stride / 3) */
            region[6] = (int32_t)m;                         /* IDCT scale m/8 */
            region[7] = (int32_t)oh;                        /* decoded image height at that scale */
        }
    }
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return status;
}

/*
 * Decode what RandomResizedCrop box (y, x, h, w) of an img_h x img_w JPEG needs for an
 * out_h x out_w output. dst (capacity cap bytes) receives RGB rows; region[0..7] = box top, left,
 * bottom, right in dst, dst's rows and columns, the IDCT scale m (of 8) and the decoded height.
 * Returns 0 when a JPEG was spliced, 1 when the original stream was decoded (no restart markers,
 * or a splice that would not fit or failed), < 0 on error.
 * The spliced stream is built at the end of dst, behind the pixels, so no extra memory is needed.
 */
int jc_decode_crop(const uint8_t *src, uint64_t len, uint32_t img_h, uint32_t img_w,
                   uint32_t y, uint32_t x, uint32_t h, uint32_t w,
                   uint32_t out_h, uint32_t out_w, uint32_t flags,
                   uint8_t *dst, uint64_t cap, int32_t *region) {
    if (h == 0 || w == 0 || (uint64_t)y + h > img_h || (uint64_t)x + w > img_w) return JC_E_ARGS;
    uint32_t m = jc_pick_scale(h, w, out_h, out_w, flags);
    if (flags & JC_SPLICE) {
        struct jc_layout lay;
        if (jc_parse(src, len, &lay) && lay.height == img_h && lay.width == img_w) {
            uint32_t mcus_x = (lay.width + lay.mcu_w - 1) / lay.mcu_w;
            if (mcus_x % lay.restart == 0) {
                uint32_t seg_per_row = mcus_x / lay.restart;
                uint32_t band_w = lay.restart * lay.mcu_w;
                /* cut at least one output pixel (2 at full scale) away from the box: smooth chroma
                 * upsampling treats the spliced image's edges as image edges */
                uint32_t pad = 16 / m;
                uint32_t mcus_y = (lay.height + lay.mcu_h - 1) / lay.mcu_h;
                uint32_t r0 = (y > pad ? y - pad : 0) / lay.mcu_h;
                uint32_t r1 = (y + h - 1 + pad) / lay.mcu_h;
                uint32_t c0 = (x > pad ? x - pad : 0) / band_w;
                uint32_t c1 = (x + w - 1 + pad) / band_w;
                if (r1 >= mcus_y) r1 = mcus_y - 1;
                if (c1 >= seg_per_row) c1 = seg_per_row - 1;
                /* the spliced image's pixels at scale m bound what the decode writes; the rest of dst
                 * holds the stream */
                uint64_t sh = (uint64_t)(r1 - r0 + 1) * lay.mcu_h, sw = (uint64_t)(c1 - c0 + 1) * band_w;
                uint64_t px = ((sh * m + 7) / 8) * ((sw * m + 7) / 8) * 3;
                uint64_t room = cap > px ? cap - px : 0;
                if (room > len / 8 + 64) {
                    uint8_t *stream = dst + (cap - room);
                    uint32_t nh = 0, nw = 0;
                    uint64_t n = jc_splice(src, len, &lay, r0, r1, c0, c1, seg_per_row, stream, room, &nh, &nw);
                    if (n > 0) {
                        uint32_t oy = y - r0 * lay.mcu_h, ox = x - c0 * band_w;
                        int rc = jc_decode_box(stream, n, oy, ox, h, w, m, flags, dst, cap - room, region, 1);
                        if (rc == 0) return 0;
                    }
                }
            }
        }
    }
    int rc = jc_decode_box(src, len, y, x, h, w, m, flags, dst, cap, region, 0);
    return rc == 0 ? 1 : rc;
}

/* ------------------------------------------------------------------ area resize */

/* One output column's (or row's) source taps, as OpenCV's computeResizeAreaTab makes them. */
static uint32_t jc_area_tab(uint32_t ssize, uint32_t dsize, uint32_t *first, uint32_t *count,
                            float *alpha, uint32_t cap) {
    double scale = 1.0 / ((double)dsize / (double)ssize);
    uint32_t k = 0;
    for (uint32_t d = 0; d < dsize; d++) {
        double f1 = d * scale, f2 = f1 + scale;
        double cell = scale < ssize - f1 ? scale : ssize - f1;
        int32_t s1 = (int32_t)ceil(f1), s2 = (int32_t)floor(f2);
        if (s2 > (int32_t)ssize - 1) s2 = (int32_t)ssize - 1;
        if (s1 > s2) s1 = s2;
        uint32_t start = k;
        first[d] = (f1 > 0 && s1 - f1 > 1e-3) ? (uint32_t)(s1 - 1) : (uint32_t)s1;
        if (s1 - f1 > 1e-3) { if (k >= cap) return 0; alpha[k++] = (float)((s1 - f1) / cell); }
        for (int32_t sx = s1; sx < s2; sx++) { if (k >= cap) return 0; alpha[k++] = (float)(1.0 / cell); }
        if (f2 - s2 > 1e-3) {
            double part = f2 - s2 < 1.0 ? f2 - s2 : 1.0;
            if (part > cell) part = cell;
            if (k >= cap) return 0;
            alpha[k++] = (float)(part / cell);
        }
        count[d] = k - start;
    }
    return k;
}

/*
 * Downscale the RGB box [top, bottom) x [left, right) of src (rows of `stride` pixels) to
 * out_h x out_w with OpenCV's INTER_AREA weights (ffcv's resize): each output pixel is the
 * area-weighted mean of the source pixels its footprint covers. Unlike OpenCV it filters the rows
 * first (contiguous, vectorised by the compiler) and the columns second, on out_h rows only; the
 * different order of float additions changes a few values by one level (measured in the tests).
 * Downscaling only (box at least the output size both ways): returns -1 otherwise, or when out of
 * memory; the caller then uses OpenCV.
 */
int jc_resize_area(const uint8_t *src, uint64_t stride, uint32_t top, uint32_t left, uint32_t bottom,
                   uint32_t right, uint8_t *dst, uint32_t out_h, uint32_t out_w) {
    uint32_t h = bottom - top, w = right - left;
    if (bottom <= top || right <= left || h < out_h || w < out_w || out_h == 0 || out_w == 0) return -1;
    uint32_t xcap = w + 2 * out_w + 2, ycap = h + 2 * out_h + 2;
    uint32_t *xfirst = malloc(sizeof(uint32_t) * 2 * (out_w + out_h));
    float *xalpha = malloc(sizeof(float) * (xcap + ycap));
    float *acc = malloc(sizeof(float) * 3 * (uint64_t)w);
    int status = -1;
    if (xfirst && xalpha && acc) {
        uint32_t *xcount = xfirst + out_w, *yfirst = xcount + out_w, *ycount = yfirst + out_h;
        float *yalpha = xalpha + xcap;
        if (jc_area_tab(w, out_w, xfirst, xcount, xalpha, xcap) && jc_area_tab(h, out_h, yfirst, ycount, yalpha, ycap)) {
            uint32_t ky = 0, n = 3 * w;
            for (uint32_t dy = 0; dy < out_h; dy++) {
                for (uint32_t t = 0; t < ycount[dy]; t++, ky++) {     /* rows: acc = sum beta * row */
                    const uint8_t *restrict row = src + ((uint64_t)(top + yfirst[dy] + t) * stride + left) * 3;
                    float beta = yalpha[ky];
                    if (t == 0) for (uint32_t i = 0; i < n; i++) acc[i] = row[i] * beta;
                    else for (uint32_t i = 0; i < n; i++) acc[i] += row[i] * beta;
                }
                uint8_t *out = dst + (uint64_t)dy * out_w * 3;
                uint32_t kx = 0;
                for (uint32_t dx = 0; dx < out_w; dx++) {                /* columns */
                    const float *p = acc + (uint64_t)xfirst[dx] * 3;
                    float a0 = 0.f, a1 = 0.f, a2 = 0.f;
                    for (uint32_t u = 0; u < xcount[dx]; u++, kx++, p += 3) {
                        float a = xalpha[kx];
                        a0 += p[0] * a; a1 += p[1] * a; a2 += p[2] * a;
                    }
                    long v0 = lrintf(a0), v1 = lrintf(a1), v2 = lrintf(a2);
                    out[3 * dx] = (uint8_t)(v0 < 0 ? 0 : v0 > 255 ? 255 : v0);
                    out[3 * dx + 1] = (uint8_t)(v1 < 0 ? 0 : v1 > 255 ? 255 : v1);
                    out[3 * dx + 2] = (uint8_t)(v2 < 0 ? 0 : v2 > 255 ? 255 : v2);
                }
            }
            status = 0;
        }
    }
    free(xfirst);
    free(xalpha);
    free(acc);
    return status;
}

/* Reads the restart interval (MCUs) and the MCU size of a JPEG: out[0] = restart interval,
 * out[1] = MCU width, out[2] = MCU height, out[3] = height, out[4] = width. Returns 1 when the
 * layout allows splicing (restart interval divides the MCU row), else 0. */
int jc_layout(const uint8_t *src, uint64_t len, int32_t *out) {
    struct jc_layout lay;
    int ok = jc_parse(src, len, &lay);
    out[0] = (int32_t)lay.restart;
    out[1] = (int32_t)lay.mcu_w;
    out[2] = (int32_t)lay.mcu_h;
    out[3] = (int32_t)lay.height;
    out[4] = (int32_t)lay.width;
    if (!ok) return 0;
    uint32_t mcus_x = (lay.width + lay.mcu_w - 1) / lay.mcu_w;
    return mcus_x % lay.restart == 0;
}

static struct PyModuleDef jc_module = {PyModuleDef_HEAD_INIT, "_jpegcrop",
                                       "crop-first JPEG decoding (loaded with ctypes)", -1, NULL};

PyMODINIT_FUNC PyInit__jpegcrop(void) { return PyModule_Create(&jc_module); }
