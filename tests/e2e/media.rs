//! Voice notes and images end to end: the real adapters against the fake Bot API and
//! the fake Discord, transcription and image parts against the fake OpenAI server.

use crate::fake_openai::{Behavior, FakeOpenAi};
use crate::fake_telegram::{FakeTelegram, Fault, MediaMsg};
use crate::harness::{Daemon, Root, TG_BOT_TOML, TG_TOKEN};

/// Rate limits that several messages in a row stay under.
const GENEROUS: &str = "messages_per_minute = 60\nburst = 20\n";

async fn tg_setup(extra: &str, bot_toml: &str) -> (FakeOpenAi, FakeTelegram, Root) {
    let llm = FakeOpenAi::start().await;
    let tg = FakeTelegram::start(TG_TOKEN, "acme_staging_bot").await;
    let root = Root::telegram(&llm.base_url, &tg.api_url, extra, bot_toml);
    (llm, tg, root)
}

/// The last sent message's text once `n` were sent to `chat`.
async fn nth_text(tg: &FakeTelegram, chat: i64, n: usize) -> String {
    crate::harness::wait_until("the reply", || tg.sent_to(chat).len() >= n).await;
    let sent = tg.sent_to(chat);
    sent.get(n - 1).map(|m| m.text.clone()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_voice_note_is_heard_answered_and_remembered() {
    let (llm, tg, root) = tg_setup("[admins]\ntelegram = [70]\n", TG_BOT_TOML).await;
    let daemon = Daemon::start(&root);
    tg.send_media(7, 7, "Vera", true, MediaMsg::voice(b"capital of France", 3));
    let first = nth_text(&tg, 7, 1).await;
    assert_eq!(
        first,
        "🎤 heard: capital of France\n\necho: heard: capital of France"
    );
    let t = llm.transcriptions();
    assert_eq!(t.len(), 1);
    assert_eq!(
        (t[0].model.as_str(), t[0].file_name.as_str()),
        ("whisper-1", "voice.ogg")
    );
    assert_eq!(t[0].bytes, b"capital of France");
    assert_eq!(tg.downloads(), 1);
    // The transcript is the user's turn: the next question carries it as memory.
    tg.send_private(7, "Vera", "and of Germany?");
    assert_eq!(nth_text(&tg, 7, 2).await, "echo: and of Germany?");
    let last = llm.requests().pop().expect("a request");
    assert!(
        last.messages
            .iter()
            .any(|(role, c)| role == "user" && c == "heard: capital of France"),
        "{:?}",
        last.messages
    );
    // A video note is heard too (its sound, as MP4).
    let mut circle = MediaMsg::voice(b"round video", 4);
    (circle.kind, circle.mime) = ("video_note", None);
    tg.send_media(7, 7, "Vera", true, circle);
    let t = nth_text(&tg, 7, 3).await;
    assert!(t.starts_with("🎤 heard: round video"), "{t}");
    assert_eq!(llm.transcriptions()[1].file_name, "video.mp4");
    // /usage shows the audio seconds.
    tg.send_private(7, "Vera", "/usage");
    let usage = nth_text(&tg, 7, 4).await;
    assert!(usage.contains("Voice: 7 s of audio today"), "{usage}");
    // /admin stats shows the seconds transcribed.
    tg.send_private(70, "Root", "/admin stats");
    let stats = nth_text(&tg, 70, 1).await;
    assert!(
        stats.contains("Media: 7 s of audio transcribed, 0 images read"),
        "{stats}"
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_photo_reaches_a_vision_model_as_an_image_part_and_is_not_stored() {
    let bot = format!("vision = true\n{TG_BOT_TOML}");
    let (llm, tg, root) = tg_setup(&format!("[limits]\n{GENEROUS}"), &bot).await;
    let daemon = Daemon::start(&root);
    tg.send_media(
        8,
        8,
        "Ian",
        true,
        MediaMsg::photo(b"\xff\xd8 fake jpeg", Some("what is this?")),
    );
    assert_eq!(nth_text(&tg, 8, 1).await, "echo: what is this? images: 1");
    let req = llm.requests().pop().expect("a request");
    let url = req.body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"][1]["image_url"]["url"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(url.starts_with("data:image/jpeg;base64,"), "{url}");
    // No caption: the default question.
    tg.send_media(8, 8, "Ian", true, MediaMsg::photo(b"another", None));
    assert_eq!(
        nth_text(&tg, 8, 2).await,
        "echo: What is in this image? images: 1"
    );
    // Memory keeps the caption and a marker, never the image.
    tg.send_private(8, "Ian", "thanks");
    assert_eq!(nth_text(&tg, 8, 3).await, "echo: thanks");
    let last = llm.requests().pop().expect("a request");
    assert_eq!(last.images, 0, "history carries no image");
    assert!(
        last.messages
            .iter()
            .any(|(_, c)| c == "what is this? [image]"),
        "{:?}",
        last.messages
    );
    // The image's hash is in the cache key: another user (same name, so the same
    // prompt) sending the same image and caption is a cache hit; another image is not.
    let asked = llm.request_count();
    let jpeg = b"\xff\xd8 fake jpeg";
    tg.send_media(
        80,
        80,
        "Ian",
        true,
        MediaMsg::photo(jpeg, Some("what is this?")),
    );
    assert_eq!(nth_text(&tg, 80, 1).await, "echo: what is this? images: 1");
    assert_eq!(llm.request_count(), asked, "served from the cache");
    tg.send_media(
        81,
        81,
        "Ian",
        true,
        MediaMsg::photo(b"other", Some("what is this?")),
    );
    assert_eq!(nth_text(&tg, 81, 1).await, "echo: what is this? images: 1");
    assert_eq!(llm.request_count(), asked + 1, "a different image is asked");
    // Too large or not an image format the model reads: refused before any download.
    let downloads = tg.downloads();
    let mut big = MediaMsg::photo(b"big", None);
    big.declared_size = Some(21 * 1024 * 1024);
    tg.send_media(8, 8, "Ian", true, big);
    let t = nth_text(&tg, 8, 4).await;
    assert!(t.contains("Your image is too large (limit 20 MB)"), "{t}");
    let mut tiff = MediaMsg::photo(b"tiff", None);
    (tiff.kind, tiff.mime) = ("document", Some("image/tiff".into()));
    tg.send_media(8, 8, "Ian", true, tiff);
    let t = nth_text(&tg, 8, 5).await;
    assert!(t.contains("can't read this image's format"), "{t}");
    assert_eq!(tg.downloads(), downloads);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_without_vision_says_it_cannot_see_images() {
    let (llm, tg, root) = tg_setup("", TG_BOT_TOML).await;
    let daemon = Daemon::start(&root);
    tg.send_media(9, 9, "Ola", true, MediaMsg::photo(b"img", Some("look")));
    let text = nth_text(&tg, 9, 1).await;
    assert!(text.contains("cannot see images"), "{text}");
    assert_eq!((llm.request_count(), tg.downloads()), (0, 0));
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_bad_media_gets_a_clear_message_and_stores_nothing() {
    let extra = format!("[llm]\nmax_retries = 1\ntimeout_secs = 2\n[limits]\n{GENEROUS}");
    let extra = extra.as_str();
    let (llm, tg, root) = tg_setup(extra, TG_BOT_TOML).await;
    let (daemon, ops) = Daemon::start_with_ops(&root).await;
    let chat = 11;
    let mut n = 0;
    let mut next = |tg: &FakeTelegram, m: MediaMsg| {
        tg.send_media(chat, chat, "Bo", true, m);
        n += 1;
        n
    };
    // Too long: refused before any download.
    let i = next(&tg, MediaMsg::voice(b"long", 301));
    let t = nth_text(&tg, chat, i).await;
    assert!(t.contains("too long (301 s, limit 300 s)"), "{t}");
    // Too large (declared): refused before any download.
    let mut big = MediaMsg::voice(b"big", 5);
    big.declared_size = Some(21 * 1024 * 1024);
    let i = next(&tg, big);
    let t = nth_text(&tg, chat, i).await;
    assert!(t.contains("too large (limit 20 MB)"), "{t}");
    // An unsupported format.
    let mut odd = MediaMsg::voice(b"wma", 5);
    odd.kind = "audio";
    odd.mime = Some("audio/x-ms-wma".into());
    let i = next(&tg, odd);
    let t = nth_text(&tg, chat, i).await;
    assert!(t.contains("can't read this audio file's format"), "{t}");
    assert_eq!(tg.downloads(), 0);
    // The download fails.
    tg.fail_next("download", Fault::ServerError);
    let i = next(&tg, MediaMsg::voice(b"lost", 2));
    let t = nth_text(&tg, chat, i).await;
    assert!(t.contains("couldn't download"), "{t}");
    // The transcription endpoint errors (after its retry), then hangs past the timeout.
    llm.push_audio(Behavior::status(500));
    llm.push_audio(Behavior::status(500));
    let i = next(&tg, MediaMsg::voice(b"err", 2));
    let t = nth_text(&tg, chat, i).await;
    assert!(t.contains("couldn't transcribe"), "{t}");
    llm.push_audio(Behavior::Hang);
    llm.push_audio(Behavior::Hang);
    let i = next(&tg, MediaMsg::voice(b"slow", 2));
    let t = nth_text(&tg, chat, i).await;
    assert!(t.contains("couldn't transcribe"), "{t}");
    assert_eq!(llm.transcriptions().len(), 4, "one retry each");
    // Nothing of it was stored: the next question goes alone.
    tg.send_private(chat, "Bo", "hello");
    assert_eq!(nth_text(&tg, chat, i + 1).await, "echo: hello");
    let req = llm.requests().pop().expect("a request");
    assert_eq!(
        req.messages.len(),
        2,
        "system + question: {:?}",
        req.messages
    );
    let (_, _, metrics) = crate::ops_http::get(ops, "/metrics").await;
    let media = |kind: &str, outcome: &str, n: u32| {
        format!("confab_media_total{{kind=\"{kind}\",outcome=\"{outcome}\",env=\"staging\"}} {n}")
    };
    for line in [
        media("voice", "too_long", 1),
        media("voice", "too_large", 1),
        media("audio", "unsupported", 1),
        media("voice", "fetch_failed", 1),
        media("voice", "transcription_failed", 2),
        "confab_audio_seconds_total{env=\"staging\"} 0".to_string(),
    ] {
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_audio_budget_notice_comes_once() {
    let (llm, tg, root) = tg_setup(
        &format!("[limits]\ndaily_audio_secs = 5\n{GENEROUS}"),
        TG_BOT_TOML,
    )
    .await;
    let daemon = Daemon::start(&root);
    tg.send_media(12, 12, "Al", true, MediaMsg::voice(b"one", 3));
    assert_eq!(
        nth_text(&tg, 12, 1).await,
        "🎤 heard: one\n\necho: heard: one"
    );
    tg.send_media(12, 12, "Al", true, MediaMsg::voice(b"two", 3));
    let t = nth_text(&tg, 12, 2).await;
    assert!(t.contains("today's voice budget"), "{t}");
    tg.send_media(12, 12, "Al", true, MediaMsg::voice(b"three", 3));
    // Typed text still works; the third voice note (handled before it) stayed silent.
    tg.send_private(12, "Al", "typed");
    assert_eq!(nth_text(&tg, 12, 3).await, "echo: typed");
    assert_eq!(tg.sent_to(12).len(), 3);
    assert_eq!(llm.transcriptions().len(), 1);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_group_voice_counts_only_as_a_reply_to_the_bot() {
    let (llm, tg, root) = tg_setup("", TG_BOT_TOML).await;
    let daemon = Daemon::start(&root);
    let group = -100777;
    tg.send_group(group, 5, "Gina", "@acme_staging_bot hi");
    assert_eq!(nth_text(&tg, group, 1).await, "echo: hi");
    let bot_msg = tg.sent_to(group)[0].message_id;
    // Not for the bot: ignored (not even downloaded).
    tg.send_media(group, 5, "Gina", false, MediaMsg::voice(b"chatter", 2));
    let mut reply = MediaMsg::voice(b"for you", 2);
    reply.reply_to_bot = Some(bot_msg);
    tg.send_media(group, 5, "Gina", false, reply);
    let t = nth_text(&tg, group, 2).await;
    assert_eq!(t, "🎤 heard: for you\n\necho: heard: for you");
    assert_eq!(tg.downloads(), 1);
    assert_eq!(llm.transcriptions().len(), 1);
    daemon.stop().await.unwrap();
}

// ---------------------------------------------------------------------------
// Discord

mod discord {
    use std::time::Duration;

    use crate::fake_discord::{DcAttachment, FakeDiscord};
    use crate::fake_openai::FakeOpenAi;
    use crate::harness::{Daemon, Root, DC_APP_STAGING, DC_BOT_ID, DC_BOT_TOML, DC_TOKEN};

    const LIMITS: &str = "[limits]\nmessages_per_minute = 10000\nburst = 100\n";

    async fn setup(bot_toml: &str) -> (FakeOpenAi, FakeDiscord, Root, Daemon) {
        let llm = FakeOpenAi::start().await;
        let dc = FakeDiscord::start(DC_TOKEN, DC_BOT_ID, DC_APP_STAGING).await;
        let root = Root::discord(&llm.base_url, &dc.api_url, LIMITS, bot_toml);
        let daemon = Daemon::start(&root);
        let up = dc.wait_connected(Duration::from_secs(20)).await;
        assert!(up, "the gateway session came up");
        (llm, dc, root, daemon)
    }

    /// The content of the `n`th bot message in `channel`.
    async fn nth(dc: &FakeDiscord, channel: u64, n: usize) -> String {
        crate::harness::wait_until("the reply", || dc.messages_in(channel).len() >= n).await;
        let msgs = dc.messages_in(channel);
        msgs.get(n - 1)
            .map(|m| m.content.clone())
            .unwrap_or_default()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn discord_voice_message_is_heard_answered_and_remembered() {
        let (llm, dc, _root, daemon) = setup(DC_BOT_TOML).await;
        let voice = DcAttachment::voice(b"tell me a joke", 2.4);
        dc.send_attachment(600, 61, "vic", "", None, voice);
        let first = nth(&dc, 600, 1).await;
        assert_eq!(
            first,
            "🎤 heard: tell me a joke\n\necho: heard: tell me a joke"
        );
        assert_eq!(llm.transcriptions()[0].file_name, "voice.ogg");
        dc.send_dm(600, 61, "vic", "another one");
        assert_eq!(nth(&dc, 600, 2).await, "echo: another one");
        let last = llm.requests().pop().expect("a request");
        assert!(
            last.messages
                .iter()
                .any(|(_, c)| c == "heard: tell me a joke"),
            "{:?}",
            last.messages
        );
        // 2.4 s counts as 3.
        dc.send_dm(600, 61, "vic", "/usage");
        let usage = nth(&dc, 600, 3).await;
        assert!(usage.contains("Voice: 3 s of audio today"), "{usage}");
        daemon.stop().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn discord_image_reaches_a_vision_model_and_bad_media_is_refused() {
        let bot = format!("vision = true\n{DC_BOT_TOML}");
        let (llm, dc, _root, daemon) = setup(&bot).await;
        dc.send_attachment(
            700,
            71,
            "ivy",
            "what is it?",
            None,
            DcAttachment::image(b"png"),
        );
        assert_eq!(nth(&dc, 700, 1).await, "echo: what is it? images: 1");
        let url = llm.requests().pop().expect("a request").body["messages"][1]["content"][1]
            ["image_url"]["url"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(url.starts_with("data:image/png;base64,"), "{url}");
        // Too long a voice message: refused before its download.
        dc.send_attachment(700, 71, "ivy", "", None, DcAttachment::voice(b"x", 301.0));
        let t = nth(&dc, 700, 2).await;
        assert!(t.contains("too long (301 s, limit 300 s)"), "{t}");
        // Larger than declared: the download stops at the limit.
        let mut big = DcAttachment::voice(&vec![b'a'; 21 * 1024 * 1024], 3.0);
        big.declared_size = Some(10);
        dc.send_attachment(700, 71, "ivy", "", None, big);
        let t = nth(&dc, 700, 3).await;
        assert!(t.contains("too large (limit 20 MB)"), "{t}");
        assert!(llm.transcriptions().is_empty());
        daemon.stop().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn discord_mirror_bot_attaches_the_spoken_answer() {
        let bot = format!("voice_replies = \"mirror\"\n{DC_BOT_TOML}");
        let (llm, dc, _root, daemon) = setup(&bot).await;
        dc.send_attachment(
            800,
            81,
            "mia",
            "",
            None,
            DcAttachment::voice(b"hi there", 1.0),
        );
        crate::harness::wait_until("the voice reply", || {
            dc.messages_in(800).iter().any(|m| m.has_attachment)
        })
        .await;
        let msgs = dc.messages_in(800);
        assert_eq!(
            msgs[0].content,
            "🎤 heard: hi there\n\necho: heard: hi there"
        );
        let voice = msgs
            .iter()
            .find(|m| m.has_attachment)
            .expect("an attachment");
        assert_eq!(voice.attachment_name.as_deref(), Some("voice-reply.ogg"));
        assert_eq!(
            llm.speeches()[0]["input"].as_str(),
            Some("echo: heard: hi there")
        );
        daemon.stop().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn discord_guild_voice_counts_as_a_reply_to_the_bot_only() {
        let (llm, dc, _root, daemon) = setup(DC_BOT_TOML).await;
        let (guild, channel) = (900, 901);
        dc.send_guild(guild, channel, 91, "gus", "hello", true);
        assert_eq!(nth(&dc, channel, 1).await, "echo: hello");
        let bot_msg = dc.messages_in(channel)[0].message_id;
        let chatter = DcAttachment::voice(b"not for you", 1.0);
        dc.send_attachment(channel, 91, "gus", "", Some((guild, false, None)), chatter);
        let reply = DcAttachment::voice(b"for you", 1.0);
        dc.send_attachment(
            channel,
            91,
            "gus",
            "",
            Some((guild, false, Some(bot_msg))),
            reply,
        );
        let t = nth(&dc, channel, 2).await;
        assert_eq!(t, "🎤 heard: for you\n\necho: heard: for you");
        assert_eq!(llm.transcriptions().len(), 1, "the other note was ignored");
        daemon.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telegram_mirror_bot_answers_a_voice_question_with_a_voice_message() {
    let bot = format!("voice_replies = \"mirror\"\n{TG_BOT_TOML}");
    let extra =
        format!("[media]\nmax_spoken_chars = 40\n[llm]\nmax_retries = 0\n[limits]\n{GENEROUS}");
    let (llm, tg, root) = tg_setup(&extra, &bot).await;
    let daemon = Daemon::start(&root);
    llm.push(Behavior::reply(
        "Paris is the capital. It is on the Seine, in the north of France.",
    ));
    tg.send_media(
        13,
        13,
        "Mo",
        true,
        MediaMsg::voice(b"capital of France?", 2),
    );
    crate::harness::wait_until("text and voice", || tg.sent_to(13).len() >= 2).await;
    let sent = tg.sent_to(13);
    assert_eq!(
        sent[0].text,
        "🎤 heard: capital of France?\n\nParis is the capital. It is on the Seine, in the north of France."
    );
    assert_eq!(sent[1].method, "sendvoice");
    // Spoken up to the configured length, cut at a sentence end.
    let audio = sent[1].document.clone().unwrap_or_default();
    assert_eq!(
        audio,
        crate::fake_openai::spoken_audio("Paris is the capital.…")
    );
    let speech = &llm.speeches()[0];
    assert_eq!(
        (speech["model"].as_str(), speech["voice"].as_str()),
        (Some("tts-1"), Some("alloy"))
    );
    assert_eq!(speech["response_format"].as_str(), Some("opus"));
    // Typed questions get text only; a failing speech endpoint leaves the text, with a note.
    tg.send_private(13, "Mo", "typed");
    assert_eq!(nth_text(&tg, 13, 3).await, "echo: typed");
    llm.push_speech(Behavior::status(500));
    tg.send_media(13, 13, "Mo", true, MediaMsg::voice(b"again", 2));
    let t = nth_text(&tg, 13, 4).await;
    assert!(
        t.ends_with("(I couldn't record a voice reply this time.)"),
        "{t}"
    );
    assert!(
        t.starts_with("🎤 heard: again\n\necho: heard: again"),
        "{t}"
    );
    assert_eq!(
        tg.sent_to(13)
            .iter()
            .filter(|m| m.method == "sendvoice")
            .count(),
        1
    );
    daemon.stop().await.unwrap();
}
