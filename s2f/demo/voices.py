"""Demo-world speech: an identity's voice saying words and numbers in its language.

espeak-ng (shipped with its data by espeakng-loader, driven through ctypes) turns text into
speech in the identity's spoken language, with one of a few timbre variants, at the identity's
speaking rate and with its source pitch set near the target. Praat's "Change gender"
(praat-parselmouth) then imposes the voice's anatomy: the formant shift ratio is
REFERENCE_VTL_CM / vocal_tract_length (formants scale inversely with tract length), the new
pitch median is the identity's mean F0 and the pitch range factor its intonation range.
Aspiration noise that follows the speech envelope adds breathiness. Output is 16 kHz mono
float32.

espeak-ng keeps global state and is not thread-safe: every call into it holds `_LOCK`, so
threads serialise; use processes for parallel synthesis (each process loads its own copy).
Determinism: the timbre variants switch off espeak's pitch flutter and roughness (their
phase persists between calls, changing every utterance), and espeak's and Praat's random
generators are seeded before every call. A fresh process that makes the same clips in the same
order gives identical samples. Across different call orders a few utterances still differ in
short stretches (about 1-3 % of samples: some other synthesis state of espeak-ng carries over
from the previous utterance), so build each clip's audio once and store it.
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading
import zlib

import numpy as np

from s2f.audio import SAMPLE_RATE
from s2f.demo.identity import Identity

REFERENCE_VTL_CM = 17.0  # vocal-tract length of espeak-ng's (adult male) voice
PITCH_FLOOR_HZ = 60.0  # pitch analysis range for Change gender (after the formant shift)
PITCH_CEILING_HZ = 400.0
SHIFT_RATE_STEP = 50  # Hz: formant-shift resampling rates are multiples of this (<= 0.3% off)
# Median F0 of the timbre variants: ESPEAK_F0_LOW_HZ at pitch parameter 0, rising by
# ESPEAK_F0_OCTAVES octaves at 100 (measured; the parameter is exponential in pitch).
ESPEAK_F0_LOW_HZ = 70.0
ESPEAK_F0_OCTAVES = 1.34
ESPEAK_RANGE = 50  # espeak's own intonation range parameter (0..100, 50 = normal)
BREATH_GAIN = 0.3  # aspiration noise amplitude at breathiness 1, relative to the envelope
ENVELOPE_S = 0.02  # s, smoothing window of the speech envelope that gates the noise
PEAK = 0.9  # output peak amplitude
PAUSE_S = (0.15, 0.4)  # silence between utterances of one clip
MIN_CLIP_FRACTION = 0.75  # a clip gets utterances until it is this fraction of `seconds`
MAX_UTTERANCES = 6
TOKENS = (3, 6)  # words or numbers per utterance, [low, high)
P_NUMBER = 0.35  # a token is a digit string (read out in the language) with this probability
NUMBER_MAX = 999

# ctypes constants of espeak-ng's speak_lib.h.
AUDIO_OUTPUT_SYNCHRONOUS = 2
INITIALIZE_DONT_EXIT = 0x8000
PARAM_RATE, PARAM_PITCH, PARAM_RANGE = 1, 3, 4
POS_CHARACTER = 1
CHARS_UTF8 = 1
PHONEMES_IPA = 0x02
EE_OK = 0

WORDS = {  # everyday words per spoken language, in the language's own script
    "en": "water house little morning people garden river happy window yellow friend table "
          "city night dog road book green time world mother bread summer light",
    "es": "agua casa pequeño mañana gente jardín río feliz ventana amarillo amigo mesa "
          "ciudad noche perro camino libro verde tiempo mundo madre pan verano luz",
    "hi": "पानी घर छोटा सुबह लोग बगीचा नदी खुश खिड़की पीला दोस्त मेज़ "
          "शहर रात कुत्ता रास्ता किताब हरा समय दुनिया माँ रोटी गर्मी रोशनी",
    "cmn": "水 房子 小 早上 人们 花园 河 高兴 窗户 黄色 朋友 桌子 "
           "城市 晚上 狗 路 书 绿色 时间 世界 妈妈 面包 夏天 光",
    "sw": "maji nyumba ndogo asubuhi watu bustani mto furaha dirisha njano rafiki meza "
          "mji usiku mbwa njia kitabu kijani wakati dunia mama mkate kiangazi mwanga",
}
SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)
_LOCK = threading.Lock()


def _stable_int(text: str) -> int:
    return zlib.crc32(text.encode())


def espeak_pitch(source_f0_hz: float) -> int:
    """espeak's pitch parameter (0..100) whose output has median F0 near `source_f0_hz`."""
    octaves = np.log2(max(source_f0_hz, 1.0) / ESPEAK_F0_LOW_HZ)
    return int(np.clip(round(100.0 * octaves / ESPEAK_F0_OCTAVES), 0, 100))


def formant_ratio(vocal_tract_length_cm: float) -> float:
    """Formant shift ratio of a tract of this length against espeak's voice."""
    return REFERENCE_VTL_CM / vocal_tract_length_cm


def add_breath(wave: np.ndarray, breathiness: float, rng: np.random.Generator) -> np.ndarray:
    """Add high-passed noise gated by the speech envelope: turbulence at a leaky glottis."""
    width = max(1, round(ENVELOPE_S * SAMPLE_RATE))
    envelope = np.sqrt(np.convolve(wave**2, np.ones(width) / width, mode="same"))
    noise = np.diff(rng.standard_normal(len(wave) + 1))  # first difference: a high-pass
    return wave + BREATH_GAIN * breathiness * envelope * noise


def _normalise(wave: np.ndarray) -> np.ndarray:
    peak = np.abs(wave).max(initial=0.0)
    return (wave * (PEAK / peak) if peak > 0 else wave).astype(np.float32)


class Espeak:
    """ctypes front end to one process's libespeak-ng in synchronous mode (see the module
    note on thread safety); build it with `espeak()`."""

    def __init__(self, library: ctypes.CDLL, sample_rate: int) -> None:
        self.library = library
        self.sample_rate = sample_rate
        self._chunks: list[np.ndarray] = []
        self._callback = SYNTH_CALLBACK(self._collect)  # referenced here so it is not freed
        library.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav: ctypes.POINTER(ctypes.c_short), count: int, events: int) -> int:
        if count > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (count,)).copy())
        return 0  # 0 = continue synthesis

    def _set_voice(self, voice: str) -> None:
        if self.library.espeak_SetVoiceByName(voice.encode()) != EE_OK:
            raise ValueError(
                f"espeak voice {voice!r} not found; use a language name present in "
                "espeakng_loader.get_data_path()/lang (e.g. en, es, hi, cmn, sw)"
            )

    def synthesize(
        self, voice: str, text: str, rate_wpm: int, pitch: int, seed: int
    ) -> np.ndarray:
        """Speech for `text`, float32 (N,) in [-1, 1] at `self.sample_rate`."""
        data = text.encode()
        with _LOCK:
            self._set_voice(voice)
            self.library.espeak_SetParameter(PARAM_RATE, int(rate_wpm), 0)
            self.library.espeak_SetParameter(PARAM_PITCH, int(pitch), 0)
            self.library.espeak_SetParameter(PARAM_RANGE, ESPEAK_RANGE, 0)
            self.library.espeak_ng_SetRandSeed(seed)
            self._chunks.clear()
            status = self.library.espeak_Synth(
                data, len(data) + 1, 0, POS_CHARACTER, 0, CHARS_UTF8, None, None
            )
            chunks, self._chunks = self._chunks, []
        if status != EE_OK or not chunks:
            raise RuntimeError(f"espeak could not speak {text!r} with voice {voice!r}")
        return np.concatenate(chunks).astype(np.float32) / 32768.0

    def phonemes(self, voice: str, text: str) -> str:
        """IPA phonemes espeak reads `text` as with `voice` (clause by clause)."""
        buffer = ctypes.c_char_p(text.encode())
        pointer = ctypes.pointer(buffer)
        clauses = []
        with _LOCK:
            self._set_voice(voice)
            while buffer.value:
                clause = self.library.espeak_TextToPhonemes(pointer, CHARS_UTF8, PHONEMES_IPA)
                clauses.append(clause.decode() if clause else "")
        return " ".join(clauses)


def _declare(library: ctypes.CDLL) -> None:
    """Argument and return types of the libespeak-ng functions used here."""
    library.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    library.espeak_SetSynthCallback.argtypes = [SYNTH_CALLBACK]
    library.espeak_SetSynthCallback.restype = None
    library.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    library.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    library.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    library.espeak_ng_SetRandSeed.restype = None
    library.espeak_Synth.argtypes = [
        ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
        ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
    ]
    library.espeak_TextToPhonemes.argtypes = [
        ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int
    ]
    library.espeak_TextToPhonemes.restype = ctypes.c_char_p


@functools.cache
def espeak() -> Espeak:
    """This process's espeak-ng, loaded and initialised on first use."""
    try:
        import espeakng_loader
    except ImportError as error:
        raise ImportError(
            "the demo voices need espeak-ng: install the demo extra: pip install 's2f[demo]'"
        ) from error
    library = ctypes.CDLL(espeakng_loader.get_library_path())
    _declare(library)
    with _LOCK:
        rate = library.espeak_Initialize(
            AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(),
            INITIALIZE_DONT_EXIT,
        )
    if rate <= 0:
        raise RuntimeError(
            f"espeak-ng failed to initialise (code {rate}) from {espeakng_loader.get_data_path()}; "
            "reinstall espeakng-loader"
        )
    return Espeak(library, rate)


def resample_poly(wave: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Polyphase resampling of (N,) between integer rates (22,050 -> 16,000 Hz is 320/441)."""
    try:
        from scipy.signal import resample_poly
    except ImportError as error:
        raise ImportError(
            "the demo voices need scipy: install the demo extra: pip install 's2f[demo]'"
        ) from error
    divisor = math.gcd(new_rate, orig_rate)
    return resample_poly(wave.astype(np.float64), new_rate // divisor, orig_rate // divisor)


def shift_formants(wave: np.ndarray, sample_rate: int, ratio: float) -> tuple[np.ndarray, float]:
    """Multiply every frequency (formants and pitch) by about `ratio`, shortening the sound by
    the same factor: resample to sample_rate / ratio and play back at sample_rate. Returns the
    sound and the exact ratio used (the new rate is a multiple of SHIFT_RATE_STEP)."""
    new_rate = round(sample_rate / ratio / SHIFT_RATE_STEP) * SHIFT_RATE_STEP
    return resample_poly(wave, sample_rate, new_rate), sample_rate / new_rate


def change_gender(
    wave: np.ndarray,
    sample_rate: int,
    formant_shift: float,
    f0_hz: float,
    pitch_range: float,
    seed: int,
) -> np.ndarray:
    """Praat's "Change gender": formants x `formant_shift`, pitch median `f0_hz`, pitch
    excursions x `pitch_range`, duration unchanged; `seed` fixes Praat's random generator
    (PSOLA draws random periods in unvoiced stretches). Returns float64 (N,).

    The formant shift is done here with a polyphase resampler, as Praat would do it with its
    slower sinc resampler; Praat then only restores the duration and sets the pitch."""
    try:
        import parselmouth
    except ImportError as error:
        raise ImportError(
            "the demo voices need Praat: install the demo extra: pip install 's2f[demo]'"
        ) from error
    parselmouth.praat.run(f"random_initializeWithSeedUnsafelyButPredictably ({seed})")
    shifted, ratio = shift_formants(wave, sample_rate, formant_shift)
    sound = parselmouth.Sound(shifted, sampling_frequency=sample_rate)
    changed = parselmouth.praat.call(
        sound, "Change gender", PITCH_FLOOR_HZ, PITCH_CEILING_HZ, 1.0, f0_hz, pitch_range, ratio
    )
    return changed.values[0]  # (N,) mono


def speak(identity: Identity, text: str, seed: int) -> np.ndarray:
    """espeak-ng reading `text` in the identity's language, timbre and rate, its source pitch
    near f0 / formant ratio (the formant shift multiplies pitch by that ratio, so PSOLA then
    moves it little): float64 (N,) at 16 kHz, before `apply_voice`."""
    engine = espeak()
    pitch = espeak_pitch(identity.f0_hz / formant_ratio(identity.vocal_tract_length))
    voice = f"{identity.language}+{identity.voice_quality['timbre']}"
    raw = engine.synthesize(voice, text, round(identity.speaking_rate), pitch, seed)
    return resample_poly(raw, engine.sample_rate, SAMPLE_RATE)


def apply_voice(identity: Identity, wave: np.ndarray, seed: int) -> np.ndarray:
    """Give 16 kHz speech the identity's anatomy and voice quality: float32 (N,), peak PEAK."""
    quality = identity.voice_quality
    shift = formant_ratio(identity.vocal_tract_length)
    changed = change_gender(wave, SAMPLE_RATE, shift, identity.f0_hz, quality["pitch_range"], seed)
    rng = np.random.default_rng([seed, _stable_int(identity.id)])
    return _normalise(add_breath(changed, quality["breathiness"], rng))


def synthesize(identity: Identity, text: str, seed: int) -> np.ndarray:
    """`identity` saying `text`: float32 (N,) at 16 kHz, peak PEAK."""
    return apply_voice(identity, speak(identity, text, seed), seed)


def utterance(identity: Identity, clip_index: int, seed: int, part: int = 0) -> str:
    """Words and numbers in the identity's spoken language; differs by clip and part."""
    rng = np.random.default_rng([seed, _stable_int(identity.id), clip_index, part])
    vocabulary = WORDS[identity.language].split()
    tokens = [
        " ".join(str(rng.integers(1, NUMBER_MAX + 1))) if rng.random() < P_NUMBER
        else vocabulary[rng.integers(len(vocabulary))]
        for _ in range(rng.integers(*TOKENS))
    ]
    middle = len(tokens) // 2
    return " ".join(tokens[:middle]) + ", " + " ".join(tokens[middle:]) + "."


def make_voice_clip(
    identity: Identity, clip_index: int, seed: int, seconds: float = 6.0
) -> np.ndarray:
    """One clip of raw speech, float32 (N,) at 16 kHz: utterances joined by short pauses
    until at least MIN_CLIP_FRACTION * `seconds` (4.5-9.5 s for 6 s; not cut or looped,
    s2f.audio.fit_duration does that)."""
    rng = np.random.default_rng([seed, _stable_int(identity.id), clip_index])
    pieces: list[np.ndarray] = []
    total = 0
    for part in range(MAX_UTTERANCES):
        if total >= MIN_CLIP_FRACTION * seconds * SAMPLE_RATE:
            break
        if pieces:
            pieces.append(np.zeros(round(rng.uniform(*PAUSE_S) * SAMPLE_RATE)))
        text = utterance(identity, clip_index, seed, part)
        pieces.append(speak(identity, text, int(rng.integers(2**31))))
        total = sum(len(piece) for piece in pieces)
    # One voice pass over the whole clip: one pitch median, and Praat's cost paid once.
    return apply_voice(identity, np.concatenate(pieces), int(rng.integers(2**31)))
