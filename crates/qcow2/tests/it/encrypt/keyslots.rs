//! Key-slot management of encrypted images (`amend -o encrypt.*`) both ways with qemu.

use super::*;

/// Key-slot management (`qemu-img amend -o encrypt.*`) both ways with qemu.
#[test]
fn key_slots_amend_interop() {
    let dir = tempdir();
    let p = dir.path().join("k.qcow2");
    qemu_create(&p, "encrypt.format=luks,encrypt.iter-time=10", "1M");
    qio(&p, &["write -P 0x4b 0 64k"]);
    let secrets = Secrets::new()
        .with("sec0", SECRET)
        .with("sec1", "second-pass")
        .with("sec2", "third-pass");
    let opts_for = |id: &str| {
        OpenOptions::new()
            .secrets(secrets.clone())
            .driver_option("encrypt.key-secret", id)
    };
    let open_rw = |id: &str| -> diskimg_blockio::Result<Arc<dyn BlockDevice>> {
        let s: Arc<dyn Storage> = Arc::new(FileStorage::open(&p, false).unwrap());
        DRIVER.open(s, &opts_for(id))
    };
    let amend = |id: &str, o: &str| -> diskimg_blockio::Result<()> {
        let dev = open_rw(id)?;
        let q = dev
            .as_any()
            .downcast_ref::<diskimg_qcow2::Qcow2Device>()
            .unwrap();
        let mut o = diskimg_blockio::OptionList::parse(o).unwrap();
        q.amend_encryption(&mut o, &secrets)?;
        assert!(o.is_empty());
        Ok(())
    };
    let qemu_opens = |pass: &str| {
        let io = image_opts(&p);
        let obj = format!("secret,id=sec0,data={pass}");
        Command::new("qemu-io")
            .args([
                "--object",
                &obj,
                "--image-opts",
                "-c",
                "read -P 0x4b 0 64k",
                &io,
            ])
            .output()
            .unwrap()
            .status
            .success()
    };
    // We add a slot; qemu opens with the new passphrase.
    amend(
        "sec0",
        "encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10",
    )
    .unwrap();
    assert!(qemu_opens("second-pass"));
    assert!(qemu_opens(SECRET));
    assert_check_clean(&p);
    // qemu adds one in slot 5; we open with it.
    let out = Command::new("qemu-img")
        .args([
            "amend",
            "--object",
            &obj(),
            "--object",
            "secret,id=sec2,data=third-pass",
            "--image-opts",
            "-o",
            "encrypt.state=active,encrypt.new-secret=sec2,encrypt.keyslot=5,encrypt.iter-time=10",
            &image_opts(&p),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        read_all(open_rw("sec2").unwrap().as_ref())[..65536]
            .iter()
            .all(|&b| b == 0x4b)
    );
    // Errors as qemu's.
    let e = |id: &str, o: &str| amend(id, o).unwrap_err().to_string();
    assert_eq!(
        e(
            "sec0",
            "encrypt.state=active,encrypt.new-secret=sec1,encrypt.keyslot=5"
        ),
        "Refusing to overwrite active keyslot 5 - please erase it first"
    );
    assert_eq!(
        e("sec0", "encrypt.state=inactive"),
        "To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given"
    );
    assert_eq!(
        e("sec0", "encrypt.state=inactive,encrypt.keyslot=3"),
        "Given keyslot 3 is already erased (inactive) "
    );
    assert_eq!(
        e("sec0", "encrypt.state=inactive,encrypt.keyslot=9"),
        "Invalid keyslot 9 specified, must be between 0 and 7"
    );
    assert_eq!(
        e(
            "sec0",
            "encrypt.state=inactive,encrypt.keyslot=5,encrypt.old-secret=sec0"
        ),
        "Given keyslot 5 doesn't contain the given old password for erase operation"
    );
    // Erase the original passphrase's slot: qemu no longer opens with it.
    amend("sec1", "encrypt.state=inactive,encrypt.old-secret=sec0").unwrap();
    assert!(!qemu_opens(SECRET));
    assert!(qemu_opens("second-pass"));
    amend("sec1", "encrypt.state=inactive,encrypt.keyslot=5").unwrap();
    assert_eq!(
        e("sec1", "encrypt.state=inactive,encrypt.old-secret=sec1"),
        "All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation"
    );
    assert_eq!(
        e("sec1", "encrypt.state=inactive,encrypt.keyslot=1"),
        "Attempt to erase the only active keyslot 1 which will erase all the data in the image irreversibly - refusing operation"
    );
    assert!(matches!(open_rw("sec2"), Err(Error::Key(_))));
    let v = qemu_check_with(&p, "second-pass");
    assert_eq!(
        v["corruptions"].as_u64().unwrap_or(0) + v["leaks"].as_u64().unwrap_or(0),
        0,
        "{v}"
    );
    // qemu's info agrees on the slots.
    let q = diskimg_testutil::qemu_info_json(&p, "qcow2");
    let slots = q["format-specific"]["data"]["encrypt"]["slots"]
        .as_array()
        .unwrap()
        .clone();
    let active: Vec<bool> = slots
        .iter()
        .map(|s| s["active"].as_bool().unwrap())
        .collect();
    assert_eq!(
        active,
        [false, true, false, false, false, false, false, false]
    );
}
